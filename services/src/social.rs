//! The social service: friend requests and friendships, groups and their members.

use crate::cache::Cached;
use crate::error::ServiceError;
use crate::users::UserService;
use crate::{Clock, Outbound};
use sai_pipeline::conversation::ConversationId;
use sai_pipeline::message::method;
use sai_storage::{AddMembersError, Friend, FriendRequest, Group, GroupMember, SocialStore, StoreError};
use serde_json::json;
use std::sync::Arc;

/// Longest friend-request message, in characters.
pub const MAX_REQUEST_MESSAGE_CHARS: usize = 256;
/// Longest group name, in characters.
pub const MAX_GROUP_NAME_CHARS: usize = 64;

/// `sg_<groupId>`.
fn group_conversation_id(group_id: &str) -> String {
    ConversationId::group(group_id).to_string()
}

/// Friends and groups.
pub struct SocialService {
    store: Arc<dyn SocialStore>,
    users: Arc<UserService>,
    outbound: Arc<Outbound>,
    clock: Arc<dyn Clock>,
    /// Most members a group may have.
    max_group_members: std::sync::atomic::AtomicU32,
    /// Whether the two users of a private conversation are friends (keyed by its id, which
    /// orders the pair): every private send asks. Invalidated by accept and unfriend.
    friendships: Cached<ConversationId, bool>,
    /// A group's members by slot: every group send and group markChat asks. Invalidated by every
    /// member change (add, remove, role).
    members: Cached<String, Arc<Vec<GroupMember>>>,
    /// Other services processes, told of every invalidation here.
    peers: crate::cache::Peers,
}

/// Friendship answers kept (about 150 bytes each).
const CACHED_FRIENDSHIPS: usize = 100_000;
/// Member lists kept (a 2,000-member list is about 200 KB; most groups are far smaller).
const CACHED_GROUPS: usize = 10_000;

fn not_found(code: &'static str, message: &str) -> ServiceError {
    ServiceError::NotFound {
        code,
        message: message.into(),
    }
}

fn forbidden(code: &'static str, message: &str) -> ServiceError {
    ServiceError::Forbidden {
        code,
        message: message.into(),
    }
}

fn conflict(code: &'static str, message: &str) -> ServiceError {
    ServiceError::Conflict {
        code,
        message: message.into(),
    }
}

impl SocialService {
    /// A service over `store`.
    pub fn new(
        store: Arc<dyn SocialStore>,
        users: Arc<UserService>,
        outbound: Arc<Outbound>,
        clock: Arc<dyn Clock>,
        max_group_members: u32,
    ) -> Self {
        Self {
            store,
            users,
            outbound,
            clock,
            max_group_members: max_group_members.into(),
            friendships: Cached::new(CACHED_FRIENDSHIPS),
            members: Cached::new(CACHED_GROUPS),
            peers: crate::cache::Peers::default(),
        }
    }

    /// The member limit of a group now.
    pub fn max_group_members(&self) -> u32 {
        self.max_group_members.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Changes the member limit (a configuration reload): groups past it keep their members
    /// and take no more.
    pub fn set_max_group_members(&self, limit: u32) {
        self.max_group_members
            .store(limit, std::sync::atomic::Ordering::Relaxed);
    }

    /// Tells `peers` of every friendship and member list invalidated here.
    pub fn set_peers(&self, peers: Arc<dyn crate::cache::CachePeers>) {
        self.peers.set(peers);
    }

    /// Forgets a cached fact a peer changed (`key`: a private conversation id or a group id).
    pub fn forget(&self, cache: crate::cache::CacheName, key: &str) {
        match cache {
            crate::cache::CacheName::Friendships => {
                if let Some(id) = ConversationId::parse(key) {
                    self.friendships.invalidate(&id);
                }
            }
            crate::cache::CacheName::Members => self.members.invalidate(&key.to_string()),
            crate::cache::CacheName::Accounts => {}
        }
    }

    /// Forgets every cached friendship and member list.
    pub fn forget_all(&self) {
        self.friendships.clear();
        self.members.clear();
    }

    fn forget_friendship(&self, id: &ConversationId) {
        self.friendships.invalidate(id);
        self.peers.tell(crate::cache::CacheName::Friendships, &id.to_string());
    }

    fn forget_members(&self, group_id: &str) {
        self.members.invalidate(&group_id.to_string());
        self.peers.tell(crate::cache::CacheName::Members, group_id);
    }

    /// Sends a friend request; the recipient, if online, gets a `friend.request` push.
    pub async fn request_friend(&self, from: &str, to: &str, message: &str) -> Result<String, ServiceError> {
        if from == to {
            return Err(ServiceError::invalid(
                "cannot_friend_self",
                "you cannot befriend yourself",
            ));
        }
        if message.chars().count() > MAX_REQUEST_MESSAGE_CHARS {
            return Err(ServiceError::invalid(
                "invalid_message",
                format!("message must be at most {MAX_REQUEST_MESSAGE_CHARS} characters"),
            ));
        }
        if !self.users.exists(to).await? {
            return Err(not_found("user_not_found", "no such user"));
        }
        if self.store.are_friends(from, to).await? {
            return Err(conflict("already_friends", "you are already friends"));
        }
        let req = FriendRequest {
            request_id: uuid::Uuid::new_v4().simple().to_string(),
            from_user: from.into(),
            to_user: to.into(),
            message: message.into(),
            status: "pending".into(),
            created_at: self.clock.now_ms(),
        };
        match self.store.create_friend_request(&req).await {
            Ok(()) => {}
            Err(StoreError::Conflict(_)) => {
                return Err(conflict(
                    "request_pending",
                    "a friend request between you is already pending",
                ))
            }
            Err(e) => return Err(e.into()),
        }
        self.outbound
            .notify(
                to,
                method::FRIEND_REQUEST,
                &json!({"requestId": req.request_id, "fromUserId": from, "message": message, "createdAt": req.created_at}),
            )
            .await;
        Ok(req.request_id)
    }

    /// Pending requests to `user`.
    pub async fn incoming(&self, user: &str) -> Result<Vec<FriendRequest>, ServiceError> {
        Ok(self.store.incoming_friend_requests(user).await?)
    }

    /// Accepts or rejects a request addressed to `user`.
    pub async fn answer(&self, user: &str, request_id: &str, accept: bool) -> Result<(), ServiceError> {
        let req = self
            .store
            .friend_request(request_id)
            .await?
            .filter(|r| r.to_user == user)
            .ok_or_else(|| not_found("request_not_found", "no such friend request addressed to you"))?;
        if !self
            .store
            .resolve_friend_request(request_id, accept, self.clock.now_ms())
            .await?
        {
            return Err(conflict("request_not_pending", "the request was already answered"));
        }
        if accept {
            self.forget_friendship(&ConversationId::private(&req.from_user, &req.to_user));
            self.outbound
                .notify(
                    &req.from_user,
                    method::FRIEND_ACCEPTED,
                    &json!({"requestId": request_id, "userId": user}),
                )
                .await;
        }
        Ok(())
    }

    /// Friends of `user`.
    pub async fn friends(&self, user: &str) -> Result<Vec<Friend>, ServiceError> {
        Ok(self.store.friends_of(user).await?)
    }

    /// Whether two users are friends.
    pub async fn are_friends(&self, a: &str, b: &str) -> Result<bool, ServiceError> {
        Ok(self
            .friendships
            .get_or_load(&ConversationId::private(a, b), self.store.are_friends(a, b))
            .await?)
    }

    /// Most users one presence query may name.
    pub const MAX_PRESENCE_IDS: usize = 100;

    /// Whether each of `ids` (the caller or their friends) is connected now.
    pub async fn presence(&self, user: &str, ids: &[String]) -> Result<Vec<bool>, ServiceError> {
        if ids.is_empty() || ids.len() > Self::MAX_PRESENCE_IDS {
            return Err(ServiceError::invalid(
                "invalid_user_ids",
                format!("name 1 to {} users", Self::MAX_PRESENCE_IDS),
            ));
        }
        for id in ids {
            if id != user && !self.are_friends(user, id).await? {
                return Err(forbidden(
                    "not_friends",
                    &format!("presence is shown to friends only ({id})"),
                ));
            }
        }
        Ok(self.outbound.online(ids).await)
    }

    /// Ends a friendship.
    pub async fn unfriend(&self, user: &str, other: &str) -> Result<(), ServiceError> {
        let removed = self.store.remove_friend(user, other).await?;
        self.forget_friendship(&ConversationId::private(user, other));
        if removed {
            Ok(())
        } else {
            Err(not_found("not_friends", "you are not friends"))
        }
    }

    async fn check_users_exist(&self, ids: &[String]) -> Result<(), ServiceError> {
        for id in ids {
            if !self.users.exists(id).await? {
                return Err(not_found("user_not_found", &format!("no such user {id}")));
            }
        }
        Ok(())
    }

    /// Creates a group owned by `owner` with the given other members.
    pub async fn create_group(&self, owner: &str, name: &str, member_ids: &[String]) -> Result<String, ServiceError> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > MAX_GROUP_NAME_CHARS {
            return Err(ServiceError::invalid(
                "invalid_group_name",
                format!("name must be 1 to {MAX_GROUP_NAME_CHARS} characters"),
            ));
        }
        let mut members = vec![owner.to_string()];
        for m in member_ids {
            if !members.contains(m) {
                members.push(m.clone());
            }
        }
        let max_group_members = self.max_group_members();
        if members.len() as u64 > u64::from(max_group_members) {
            return Err(conflict(
                "group_full",
                &format!("a group may have at most {max_group_members} members"),
            ));
        }
        self.check_users_exist(&members[1..]).await?;
        let group = Group {
            group_id: uuid::Uuid::new_v4().simple().to_string(),
            name: name.to_string(),
            owner_id: owner.to_string(),
            member_count: members.len() as u32,
            created_at: self.clock.now_ms(),
        };
        self.store
            .create_group(&group, &group_conversation_id(&group.group_id), &members)
            .await?;
        // A send to this id before it existed cached an empty member list.
        self.forget_members(&group.group_id);
        Ok(group.group_id)
    }

    /// The group, for a member.
    pub async fn group_for(&self, user: &str, group_id: &str) -> Result<(Group, GroupMember), ServiceError> {
        let group = self
            .store
            .group(group_id)
            .await?
            .ok_or_else(|| not_found("group_not_found", "no such group"))?;
        let me = self
            .store
            .group_member(group_id, user)
            .await?
            .ok_or_else(|| forbidden("not_a_member", "you are not a member of this group"))?;
        Ok((group, me))
    }

    /// A group's member record for `user`, if a member (from the cached member list).
    pub async fn member(&self, group_id: &str, user: &str) -> Result<Option<GroupMember>, ServiceError> {
        Ok(self
            .members(group_id)
            .await?
            .iter()
            .find(|m| m.user_id == user)
            .cloned())
    }

    /// Groups of `user`.
    pub async fn groups_of(&self, user: &str) -> Result<Vec<(Group, GroupMember)>, ServiceError> {
        Ok(self.store.groups_of(user).await?)
    }

    /// All members by slot (raw; callers check membership first); empty for no such group.
    pub async fn members(&self, group_id: &str) -> Result<Arc<Vec<GroupMember>>, ServiceError> {
        let load = async { self.store.group_members(group_id).await.map(Arc::new) };
        Ok(self.members.get_or_load(&group_id.to_string(), load).await?)
    }

    /// Adds members; owner or admin only.
    pub async fn add_members(
        &self,
        user: &str,
        group_id: &str,
        user_ids: &[String],
    ) -> Result<Vec<GroupMember>, ServiceError> {
        let (_, me) = self.group_for(user, group_id).await?;
        if me.role != "owner" && me.role != "admin" {
            return Err(forbidden(
                "not_group_admin",
                "only the owner or an admin can add members",
            ));
        }
        if user_ids.is_empty() {
            return Err(ServiceError::invalid("missing_field", "userIds must not be empty"));
        }
        self.check_users_exist(user_ids).await?;
        let conv = group_conversation_id(group_id);
        let added = self
            .store
            .add_group_members(group_id, &conv, user_ids, self.max_group_members(), self.clock.now_ms())
            .await;
        self.forget_members(group_id);
        match added {
            Ok(added) => Ok(added),
            Err(AddMembersError::Full { limit, .. }) => Err(conflict(
                "group_full",
                &format!("a group may have at most {limit} members"),
            )),
            Err(AddMembersError::NoGroup) => Err(not_found("group_not_found", "no such group")),
            Err(AddMembersError::Store(e)) => Err(e.into()),
        }
    }

    /// Removes `target`: the owner or an admin removes others (an admin not the owner nor another
    /// admin), any member removes themselves (leaves). The owner cannot leave.
    pub async fn remove_member(&self, user: &str, group_id: &str, target: &str) -> Result<(), ServiceError> {
        let (group, me) = self.group_for(user, group_id).await?;
        if target == group.owner_id {
            return Err(if user == target {
                conflict("owner_cannot_leave", "the owner cannot leave the group")
            } else {
                forbidden("not_group_admin", "the owner cannot be removed")
            });
        }
        if user != target {
            let them = self
                .store
                .group_member(group_id, target)
                .await?
                .ok_or_else(|| not_found("member_not_found", "that user is not a member"))?;
            let allowed = me.role == "owner" || (me.role == "admin" && them.role == "member");
            if !allowed {
                return Err(forbidden(
                    "not_group_admin",
                    "only the owner or an admin can remove members",
                ));
            }
        }
        let removed = self
            .store
            .remove_group_member(group_id, &group_conversation_id(group_id), target)
            .await?;
        self.forget_members(group_id);
        if removed {
            Ok(())
        } else {
            Err(not_found("member_not_found", "that user is not a member"))
        }
    }

    /// Makes a member an admin or a plain member; owner only.
    pub async fn set_role(&self, user: &str, group_id: &str, target: &str, role: &str) -> Result<(), ServiceError> {
        let (group, _) = self.group_for(user, group_id).await?;
        if group.owner_id != user {
            return Err(forbidden("not_group_owner", "only the owner can change roles"));
        }
        if role != "admin" && role != "member" {
            return Err(ServiceError::invalid("invalid_role", "role must be admin or member"));
        }
        if target == group.owner_id {
            return Err(ServiceError::invalid("invalid_role", "the owner's role cannot change"));
        }
        let changed = self.store.set_group_role(group_id, target, role).await?;
        self.forget_members(group_id);
        if changed {
            Ok(())
        } else {
            Err(not_found("member_not_found", "that user is not a member"))
        }
    }
}
