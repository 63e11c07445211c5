//! [`SocialStore`] on MySQL: friend requests, friendships, groups and their members. The same
//! statements as the SQLite adapter's where MySQL has them; each multi-row write is one
//! transaction, run again when it loses a deadlock (see [`super::retrying`]).

use super::{corrupt, get_u64, retrying, unavailable, write_error, MySqlStore};
use async_trait::async_trait;
use sai_storage::{AddMembersError, Friend, FriendRequest, Group, GroupMember, SocialStore, StoreError, StoreResult};
use sqlx::mysql::MySqlRow;
use sqlx::Row;

fn request_from_row(r: &MySqlRow) -> StoreResult<FriendRequest> {
    Ok(FriendRequest {
        request_id: r.try_get("request_id").map_err(corrupt)?,
        from_user: r.try_get("from_user").map_err(corrupt)?,
        to_user: r.try_get("to_user").map_err(corrupt)?,
        message: r.try_get("message").map_err(corrupt)?,
        status: r.try_get("status").map_err(corrupt)?,
        created_at: r.try_get("created_at").map_err(corrupt)?,
    })
}

fn group_from_row(r: &MySqlRow) -> StoreResult<Group> {
    Ok(Group {
        group_id: r.try_get("group_id").map_err(corrupt)?,
        name: r.try_get("name").map_err(corrupt)?,
        owner_id: r.try_get("owner_id").map_err(corrupt)?,
        member_count: u32::try_from(get_u64(r, "member_count")?)
            .map_err(|_| StoreError::Corrupt("member_count".into()))?,
        created_at: r.try_get("created_at").map_err(corrupt)?,
    })
}

fn member_from_row(r: &MySqlRow) -> StoreResult<GroupMember> {
    Ok(GroupMember {
        user_id: r.try_get("user_id").map_err(corrupt)?,
        role: r.try_get("role").map_err(corrupt)?,
        slot: u32::try_from(get_u64(r, "slot")?).map_err(|_| StoreError::Corrupt("slot".into()))?,
        joined_at: r.try_get("joined_at").map_err(corrupt)?,
    })
}

const GROUP_COLUMNS: &str = "g.group_id, g.name, g.owner_id, g.member_count, g.created_at";

#[async_trait]
impl SocialStore for MySqlStore {
    async fn create_friend_request(&self, req: &FriendRequest) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO friend_requests (request_id, from_user, to_user, message, status, created_at)
             VALUES (?, ?, ?, ?, 'pending', ?)",
        )
        .bind(&req.request_id)
        .bind(&req.from_user)
        .bind(&req.to_user)
        .bind(&req.message)
        .bind(req.created_at)
        .execute(&self.pool)
        .await
        .map_err(write_error)?;
        Ok(())
    }

    async fn friend_request(&self, request_id: &str) -> StoreResult<Option<FriendRequest>> {
        sqlx::query("SELECT * FROM friend_requests WHERE request_id = ?")
            .bind(request_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?
            .as_ref()
            .map(request_from_row)
            .transpose()
    }

    async fn incoming_friend_requests(&self, user_id: &str) -> StoreResult<Vec<FriendRequest>> {
        let rows = sqlx::query(
            "SELECT * FROM friend_requests WHERE to_user = ? AND status = 'pending' ORDER BY created_at, request_id",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(request_from_row).collect()
    }

    async fn resolve_friend_request(&self, request_id: &str, accept: bool, now: i64) -> StoreResult<bool> {
        let pool = &self.pool;
        retrying(move || async move {
            let mut tx = pool.begin().await.map_err(unavailable)?;
            let status = if accept { "accepted" } else { "rejected" };
            let row = sqlx::query(
                "SELECT from_user, to_user FROM friend_requests WHERE request_id = ? AND status = 'pending' FOR UPDATE",
            )
            .bind(request_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(unavailable)?;
            let Some(row) = row else {
                return Ok(false);
            };
            sqlx::query("UPDATE friend_requests SET status = ? WHERE request_id = ?")
                .bind(status)
                .bind(request_id)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            if accept {
                let from: String = row.try_get("from_user").map_err(corrupt)?;
                let to: String = row.try_get("to_user").map_err(corrupt)?;
                for (a, b) in [(&from, &to), (&to, &from)] {
                    sqlx::query("INSERT IGNORE INTO friends (user_id, friend_id, since) VALUES (?, ?, ?)")
                        .bind(a)
                        .bind(b)
                        .bind(now)
                        .execute(&mut *tx)
                        .await
                        .map_err(unavailable)?;
                }
            }
            tx.commit().await.map_err(unavailable)?;
            Ok(true)
        })
        .await
    }

    async fn friends_of(&self, user_id: &str) -> StoreResult<Vec<Friend>> {
        let rows = sqlx::query("SELECT friend_id, since FROM friends WHERE user_id = ? ORDER BY since, friend_id")
            .bind(user_id)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                Ok(Friend {
                    user_id: r.try_get("friend_id").map_err(corrupt)?,
                    since: r.try_get("since").map_err(corrupt)?,
                })
            })
            .collect()
    }

    async fn are_friends(&self, a: &str, b: &str) -> StoreResult<bool> {
        let row = sqlx::query("SELECT 1 FROM friends WHERE user_id = ? AND friend_id = ?")
            .bind(a)
            .bind(b)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(row.is_some())
    }

    async fn remove_friend(&self, a: &str, b: &str) -> StoreResult<bool> {
        let done =
            sqlx::query("DELETE FROM friends WHERE (user_id = ? AND friend_id = ?) OR (user_id = ? AND friend_id = ?)")
                .bind(a)
                .bind(b)
                .bind(b)
                .bind(a)
                .execute(&self.pool)
                .await
                .map_err(unavailable)?;
        Ok(done.rows_affected() > 0)
    }

    async fn create_group(&self, g: &Group, conversation_id: &str, members: &[String]) -> StoreResult<()> {
        let pool = &self.pool;
        retrying(move || async move {
            let mut tx = pool.begin().await.map_err(unavailable)?;
            sqlx::query(
                "INSERT INTO chat_groups (group_id, name, owner_id, member_count, next_slot, created_at)
             VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(&g.group_id)
            .bind(&g.name)
            .bind(&g.owner_id)
            .bind(members.len() as i64)
            .bind(members.len() as i64)
            .bind(g.created_at)
            .execute(&mut *tx)
            .await
            .map_err(write_error)?;
            sqlx::query(
                "INSERT INTO conversations (conversation_id, chat_type, max_seq, updated_at) VALUES (?, 1, 0, ?)",
            )
            .bind(conversation_id)
            .bind(g.created_at)
            .execute(&mut *tx)
            .await
            .map_err(write_error)?;
            for (slot, user) in members.iter().enumerate() {
                let role = if *user == g.owner_id { "owner" } else { "member" };
                sqlx::query(
                    "INSERT INTO group_members (group_id, user_id, role, slot, joined_at) VALUES (?, ?, ?, ?, ?)",
                )
                .bind(&g.group_id)
                .bind(user)
                .bind(role)
                .bind(slot as i64)
                .bind(g.created_at)
                .execute(&mut *tx)
                .await
                .map_err(write_error)?;
                sqlx::query("INSERT INTO conversation_members (user_id, conversation_id) VALUES (?, ?)")
                    .bind(user)
                    .bind(conversation_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(write_error)?;
            }
            tx.commit().await.map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn group(&self, group_id: &str) -> StoreResult<Option<Group>> {
        sqlx::query("SELECT g.* FROM chat_groups g WHERE group_id = ?")
            .bind(group_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?
            .as_ref()
            .map(group_from_row)
            .transpose()
    }

    async fn groups_of(&self, user_id: &str) -> StoreResult<Vec<(Group, GroupMember)>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {GROUP_COLUMNS}, m.user_id, m.role, m.slot, m.joined_at FROM group_members m
             JOIN chat_groups g ON g.group_id = m.group_id WHERE m.user_id = ? ORDER BY g.created_at, g.group_id"
        ));
        let rows = sqlx::query(sql)
            .bind(user_id)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter()
            .map(|r| Ok((group_from_row(r)?, member_from_row(r)?)))
            .collect()
    }

    async fn group_members(&self, group_id: &str) -> StoreResult<Vec<GroupMember>> {
        let rows = sqlx::query("SELECT * FROM group_members WHERE group_id = ? ORDER BY slot")
            .bind(group_id)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter().map(member_from_row).collect()
    }

    async fn group_member(&self, group_id: &str, user_id: &str) -> StoreResult<Option<GroupMember>> {
        sqlx::query("SELECT * FROM group_members WHERE group_id = ? AND user_id = ?")
            .bind(group_id)
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?
            .as_ref()
            .map(member_from_row)
            .transpose()
    }

    async fn add_group_members(
        &self,
        group_id: &str,
        conversation_id: &str,
        users: &[String],
        limit: u32,
        now: i64,
    ) -> Result<Vec<GroupMember>, AddMembersError> {
        let pool = &self.pool;
        retrying(move || async move {
            let mut tx = pool.begin().await.map_err(unavailable)?;
            // The group's row lock orders concurrent adds (slots stay dense and unique); the
            // conversation's row lock orders the join seq against appends.
            let Some(g) = sqlx::query("SELECT member_count, next_slot FROM chat_groups WHERE group_id = ? FOR UPDATE")
                .bind(group_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(unavailable)?
            else {
                return Err(AddMembersError::NoGroup);
            };
            let count = get_u64(&g, "member_count")?;
            let mut next_slot = get_u64(&g, "next_slot")?;
            let max_seq: i64 =
                sqlx::query_scalar("SELECT max_seq FROM conversations WHERE conversation_id = ? FOR UPDATE")
                    .bind(conversation_id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(unavailable)?
                    .unwrap_or(0);
            let mut fresh = Vec::new();
            for u in users {
                if fresh.iter().any(|m: &GroupMember| &m.user_id == u) {
                    continue;
                }
                let exists = sqlx::query("SELECT 1 FROM group_members WHERE group_id = ? AND user_id = ?")
                    .bind(group_id)
                    .bind(u)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(unavailable)?;
                if exists.is_none() {
                    fresh.push(GroupMember {
                        user_id: u.clone(),
                        role: "member".into(),
                        slot: u32::try_from(next_slot).map_err(|_| StoreError::Corrupt("slot overflow".into()))?,
                        joined_at: now,
                    });
                    next_slot += 1;
                }
            }
            let would_have = count + fresh.len() as u64;
            if would_have > u64::from(limit) {
                return Err(AddMembersError::Full {
                    would_have: u32::try_from(would_have).unwrap_or(u32::MAX),
                    limit,
                });
            }
            for m in &fresh {
                sqlx::query(
                    "INSERT INTO group_members (group_id, user_id, role, slot, joined_at) VALUES (?, ?, ?, ?, ?)",
                )
                .bind(group_id)
                .bind(&m.user_id)
                .bind(&m.role)
                .bind(i64::from(m.slot))
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
                sqlx::query(
                "INSERT INTO conversation_members (user_id, conversation_id, read_seq, joined_seq) VALUES (?, ?, ?, ?)
                 ON DUPLICATE KEY UPDATE read_seq = VALUES(read_seq), received_seq = VALUES(read_seq),
                   joined_seq = VALUES(joined_seq)",
            )
            .bind(&m.user_id)
            .bind(conversation_id)
            .bind(max_seq)
            .bind(max_seq)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            }
            sqlx::query("UPDATE chat_groups SET member_count = ?, next_slot = ? WHERE group_id = ?")
                .bind(would_have as i64)
                .bind(next_slot as i64)
                .bind(group_id)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)?;
            Ok(fresh)
        })
        .await
    }

    async fn remove_group_member(&self, group_id: &str, conversation_id: &str, user_id: &str) -> StoreResult<bool> {
        let pool = &self.pool;
        retrying(move || async move {
            let mut tx = pool.begin().await.map_err(unavailable)?;
            let done = sqlx::query("DELETE FROM group_members WHERE group_id = ? AND user_id = ?")
                .bind(group_id)
                .bind(user_id)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            if done.rows_affected() == 0 {
                return Ok(false);
            }
            sqlx::query("DELETE FROM conversation_members WHERE user_id = ? AND conversation_id = ?")
                .bind(user_id)
                .bind(conversation_id)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            sqlx::query("UPDATE chat_groups SET member_count = member_count - 1 WHERE group_id = ?")
                .bind(group_id)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)?;
            Ok(true)
        })
        .await
    }

    async fn set_group_role(&self, group_id: &str, user_id: &str, role: &str) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE group_members SET role = ? WHERE group_id = ? AND user_id = ?")
            .bind(role)
            .bind(group_id)
            .bind(user_id)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected() > 0)
    }
}
