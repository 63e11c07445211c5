//! Service errors, classified by who caused them, with the stable codes clients see.
//!
//! A [`ServiceError`] maps to an HTTP status + `{"code","message"}` body, a gRPC status, or a
//! WebSocket error frame. Backend failures are logged once, where they are turned into
//! [`ServiceError::Unavailable`] / [`ServiceError::Internal`], and the client sees only the code.

use sai_storage::StoreError;

/// An error a service returns to its caller.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request is malformed or a value is out of range (400).
    #[error("{message}")]
    Invalid {
        /// Stable code.
        code: &'static str,
        /// Detail for the client.
        message: String,
    },
    /// Missing, malformed, expired or forged credentials (401).
    #[error("{message}")]
    Unauthorized {
        /// Stable code.
        code: &'static str,
        /// Detail for the client.
        message: String,
    },
    /// Authenticated but not allowed (403).
    #[error("{message}")]
    Forbidden {
        /// Stable code.
        code: &'static str,
        /// Detail for the client.
        message: String,
    },
    /// The thing named does not exist (404).
    #[error("{message}")]
    NotFound {
        /// Stable code.
        code: &'static str,
        /// Detail for the client.
        message: String,
    },
    /// The request conflicts with existing state (409).
    #[error("{message}")]
    Conflict {
        /// Stable code.
        code: &'static str,
        /// Detail for the client.
        message: String,
    },
    /// Too many attempts from this account or address; retry after the given seconds (429).
    #[error("too many attempts: retry in {retry_after_secs} s")]
    TooManyAttempts {
        /// Seconds until an attempt is accepted again (the `Retry-After` header).
        retry_after_secs: u64,
    },
    /// A bounded queue in front of expensive work is full; retry shortly (503).
    #[error("server busy: retry shortly")]
    Busy,
    /// A backend is unavailable; retrying may succeed (503).
    #[error("service temporarily unavailable")]
    Unavailable,
    /// A bug or corrupt data (500).
    #[error("internal error")]
    Internal,
}

impl ServiceError {
    /// 400 with `code`.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            code,
            message: message.into(),
        }
    }

    /// The stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid { code, .. }
            | Self::Unauthorized { code, .. }
            | Self::Forbidden { code, .. }
            | Self::NotFound { code, .. }
            | Self::Conflict { code, .. } => code,
            Self::TooManyAttempts { .. } => "too_many_attempts",
            Self::Busy => "server_busy",
            Self::Unavailable => "service_unavailable",
            Self::Internal => "internal_error",
        }
    }

    /// HTTP status.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Invalid { .. } => 400,
            Self::Unauthorized { .. } => 401,
            Self::Forbidden { .. } => 403,
            Self::NotFound { .. } => 404,
            Self::Conflict { .. } => 409,
            Self::TooManyAttempts { .. } => 429,
            Self::Busy | Self::Unavailable => 503,
            Self::Internal => 500,
        }
    }

    /// Seconds a client should wait before retrying (`Retry-After`), where that is known.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::TooManyAttempts { retry_after_secs } => Some(*retry_after_secs),
            Self::Busy => Some(1),
            _ => None,
        }
    }

    /// gRPC status with the code in the message prefix (`code: message`).
    pub fn to_status(&self) -> tonic::Status {
        let msg = format!("{}: {}", self.code(), self);
        match self {
            Self::Invalid { .. } => tonic::Status::invalid_argument(msg),
            Self::Unauthorized { .. } => tonic::Status::unauthenticated(msg),
            Self::Forbidden { .. } => tonic::Status::permission_denied(msg),
            Self::NotFound { .. } => tonic::Status::not_found(msg),
            Self::Conflict { .. } => tonic::Status::already_exists(msg),
            Self::TooManyAttempts { .. } | Self::Busy => tonic::Status::resource_exhausted(msg),
            Self::Unavailable => tonic::Status::unavailable(msg),
            Self::Internal => tonic::Status::internal(msg),
        }
    }
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => {
                tracing::warn!(error = %m, "storage unavailable");
                Self::Unavailable
            }
            StoreError::Corrupt(m) => {
                tracing::error!(error = %m, "corrupt stored data");
                Self::Internal
            }
            StoreError::Conflict(m) => {
                // Conflicts the service expects are matched before this conversion.
                tracing::error!(error = %m, "unexpected storage conflict");
                Self::Internal
            }
        }
    }
}
