//! Conversations: their kind ([`ChatType`]) and their typed id ([`ConversationId`]).
//!
//! On the wire and in storage a conversation id is a string: `si_<a>_<b>` for the private
//! conversation of users `a < b`, `sg_<groupId>` for a group. Everything that needs to know which
//! kind an id is, or who the other member of a private one is, asks [`ConversationId`] instead of
//! parsing prefixes itself.

use std::fmt;

/// Conversation kinds (`chatType` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChatType {
    /// `1`: a group conversation.
    Group,
    /// `2`: a one-to-one conversation.
    Private,
}

impl ChatType {
    /// The wire value.
    pub fn as_u8(self) -> u8 {
        match self {
            Self::Group => 1,
            Self::Private => 2,
        }
    }

    /// Parses the wire value.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Group),
            2 => Some(Self::Private),
            _ => None,
        }
    }
}

/// A conversation id, typed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConversationId {
    /// Two users; `low < high` (byte order), so each pair has one id.
    Private {
        /// The smaller user id.
        low: String,
        /// The larger user id.
        high: String,
    },
    /// A group.
    Group(String),
}

const PRIVATE_PREFIX: &str = "si_";
const GROUP_PREFIX: &str = "sg_";

impl ConversationId {
    /// The private conversation of `a` and `b`, in either order.
    pub fn private(a: &str, b: &str) -> Self {
        let (low, high) = if a <= b { (a, b) } else { (b, a) };
        Self::Private {
            low: low.to_string(),
            high: high.to_string(),
        }
    }

    /// The private conversation of `a` and `b` when both can be one end of one: each id is
    /// non-empty and has no `_`, the separator of the wire form `si_<low>_<high>`. Otherwise
    /// `None`: with `_` allowed, the pairs (`a`, `a_b`) and (`a_a`, `b`) would both be
    /// `si_a_a_b`, one conversation, and each pair would read the other's messages.
    pub fn private_between(a: &str, b: &str) -> Option<Self> {
        let ok = |id: &str| !id.is_empty() && !id.contains('_');
        (ok(a) && ok(b)).then(|| Self::private(a, b))
    }

    /// The conversation of group `group_id`.
    pub fn group(group_id: &str) -> Self {
        Self::Group(group_id.to_string())
    }

    /// Reads a wire id; `None` for anything that is neither `si_<a>_<b>` nor `sg_<id>`. User ids
    /// contain no `_` (the split is at the first one after the prefix): registration makes hex
    /// ids and `sai-im admin seed-users` refuses `_` in its prefix.
    pub fn parse(s: &str) -> Option<Self> {
        if let Some(rest) = s.strip_prefix(PRIVATE_PREFIX) {
            let (a, b) = rest.split_once('_')?;
            if a.is_empty() || b.is_empty() {
                return None;
            }
            return Some(Self::Private {
                low: a.to_string(),
                high: b.to_string(),
            });
        }
        let g = s.strip_prefix(GROUP_PREFIX)?;
        (!g.is_empty()).then(|| Self::Group(g.to_string()))
    }

    /// Group or private.
    pub fn chat_type(&self) -> ChatType {
        match self {
            Self::Private { .. } => ChatType::Private,
            Self::Group(_) => ChatType::Group,
        }
    }

    /// The group's id, for a group conversation.
    pub fn group_id(&self) -> Option<&str> {
        match self {
            Self::Group(g) => Some(g),
            Self::Private { .. } => None,
        }
    }

    /// The other member of a private conversation, seen from `me` (`None` for a group).
    pub fn peer_of(&self, me: &str) -> Option<&str> {
        match self {
            Self::Private { low, high } => Some(if low == me { high } else { low }),
            Self::Group(_) => None,
        }
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Private { low, high } => write!(f, "{PRIVATE_PREFIX}{low}_{high}"),
            Self::Group(g) => write!(f, "{GROUP_PREFIX}{g}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_would_share_a_wire_form_get_no_private_conversation() {
        // (a, a_b) and (a_a, b) would both be si_a_a_b.
        assert_eq!(
            ConversationId::private("a", "a_b").to_string(),
            ConversationId::private("a_a", "b").to_string()
        );
        assert_eq!(ConversationId::private_between("a", "a_b"), None);
        assert_eq!(ConversationId::private_between("a_a", "b"), None);
        assert_eq!(ConversationId::private_between("", "b"), None);
        let ok = ConversationId::private_between("b", "a").unwrap();
        assert_eq!(ok.to_string(), "si_a_b");
        assert_eq!(ConversationId::parse("si_a_b"), Some(ok));
    }

    #[test]
    fn private_ids_are_order_free_and_round_trip() {
        let a = ConversationId::private("bob", "alice");
        assert_eq!(a, ConversationId::private("alice", "bob"));
        assert_eq!(a.to_string(), "si_alice_bob");
        assert_eq!(ConversationId::parse("si_alice_bob"), Some(a.clone()));
        assert_eq!(a.peer_of("alice"), Some("bob"));
        assert_eq!(a.peer_of("bob"), Some("alice"));
        assert_eq!(a.chat_type(), ChatType::Private);
        assert_eq!(a.group_id(), None);
    }

    #[test]
    fn group_ids_round_trip() {
        let g = ConversationId::parse("sg_g1").unwrap();
        assert_eq!(g, ConversationId::group("g1"));
        assert_eq!(g.to_string(), "sg_g1");
        assert_eq!(g.group_id(), Some("g1"));
        assert_eq!(g.peer_of("anyone"), None);
        assert_eq!(g.chat_type(), ChatType::Group);
    }

    #[test]
    fn malformed_ids_are_refused() {
        for s in ["", "si_", "si_a", "si__b", "si_a_", "sg_", "xx_a_b", "g1", "SG_g1"] {
            assert_eq!(ConversationId::parse(s), None, "{s:?}");
        }
    }

    #[test]
    fn chat_type_wire_values() {
        for t in [ChatType::Group, ChatType::Private] {
            assert_eq!(ChatType::from_u8(t.as_u8()), Some(t));
        }
        assert_eq!(ChatType::from_u8(0), None);
        assert_eq!(ChatType::from_u8(3), None);
    }
}
