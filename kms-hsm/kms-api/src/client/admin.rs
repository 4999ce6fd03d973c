//! The admin calls (jobs, KEK destruction, audit, backup and restore helpers): sent once to
//! the first endpoint, the admin socket.

use bytes::Bytes;
use http::Method;

use crate::ids::KekVersion;

use super::*;

impl KmsClient {
    /// Admin: KEK versions, DEK counts and jobs (`GET /admin/status`).
    ///
    /// # Errors
    /// [`ClientError`]; `Api { code: Forbidden, .. }` on a non-admin endpoint.
    pub async fn admin_status(&self) -> Result<crate::admin::StatusResponse, ClientError> {
        self.call_json::<(), _>(Method::GET, "/admin/status", None)
            .await
    }

    /// Admin: starts a KEK rotation, or returns the one running (`POST /admin/kek/rotate`).
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn rotate_kek(&self) -> Result<crate::admin::StartJobResponse, ClientError> {
        self.call_once(
            self.first(),
            Method::POST,
            "/admin/kek/rotate",
            Bytes::new(),
            self.inner.cfg.request_timeout,
        )
        .await
    }

    /// Admin: starts a verification of every DEK (`POST /admin/verify`).
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn start_verify(&self) -> Result<crate::admin::StartJobResponse, ClientError> {
        self.call_once(
            self.first(),
            Method::POST,
            "/admin/verify",
            Bytes::new(),
            self.inner.cfg.request_timeout,
        )
        .await
    }

    /// Admin: one job (`GET /admin/jobs/{id}`).
    ///
    /// # Errors
    /// [`ClientError`]; `Api { code: UnknownJob, .. }`.
    pub async fn job(&self, id: &crate::admin::JobId) -> Result<crate::admin::Job, ClientError> {
        let path = format!("/admin/jobs/{id}");
        self.call_json::<(), _>(Method::GET, &path, None).await
    }

    /// Admin: every job (`GET /admin/jobs`).
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn jobs(&self) -> Result<crate::admin::JobsResponse, ClientError> {
        self.call_json::<(), _>(Method::GET, "/admin/jobs", None)
            .await
    }

    /// Admin: removes a retired KEK version from the HSM (`POST /admin/kek/destroy`). Not
    /// retried: it is not idempotent in its answer.
    ///
    /// # Errors
    /// [`ClientError`]; `Api { code: KekNotRetired | KekInUse, .. }` when refused.
    pub async fn destroy_kek(
        &self,
        version: KekVersion,
    ) -> Result<crate::admin::DestroyKekResponse, ClientError> {
        let body = serde_json::to_vec(&crate::admin::DestroyKekRequest { version })
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.call_once(
            self.first(),
            Method::POST,
            "/admin/kek/destroy",
            Bytes::from(body),
            self.inner.cfg.request_timeout,
        )
        .await
    }

    /// Admin: checks the audit log's chain and head (`POST /admin/audit/verify`).
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn audit_verify(&self) -> Result<crate::admin::AuditVerifyResponse, ClientError> {
        self.call_once(
            self.first(),
            Method::POST,
            "/admin/audit/verify",
            Bytes::new(),
            self.inner.cfg.request_timeout,
        )
        .await
    }

    /// Admin: removes the audit entries up to an archived one (`POST /admin/audit/compact`).
    ///
    /// # Errors
    /// [`ClientError`]; `Api` with `archive_mismatch` when the request does not match the log.
    pub async fn audit_compact(
        &self,
        req: &crate::admin::AuditCompactRequest,
    ) -> Result<crate::admin::AuditCompactResponse, ClientError> {
        self.call_json(Method::POST, "/admin/audit/compact", Some(req))
            .await
    }

    /// Admin: audit entries after sequence number `after` (`GET /admin/audit`).
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn audit_entries(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<crate::admin::AuditListResponse, ClientError> {
        let path = format!("/admin/audit?after={after}&limit={limit}");
        self.call_json::<(), _>(Method::GET, &path, None).await
    }
}
