//! How a worker gets (back) a usable session: the reset gate, re-login, library reset and
//! reopen with backoff (see the parent module's documentation for when each applies).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLockReadGuard};
use std::time::{Duration, Instant};

use cryptoki::error::RvError;

use super::super::context::Reset;
use super::super::token::{self, OpError};
use super::*;
use crate::backend::BackendError;

/// First reconnect delay after a failed reopen, doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub(super) struct Backoff {
    pub(super) retry_at: Instant,
    pub(super) delay: Duration,
    pub(super) last_error: String,
}

/// What the failure of one attempt calls for.
pub(super) enum Recovery {
    Relogin,
    Reset(String),
}

impl Worker {
    /// A read guard with a live session of the current generation, reopening if needed.
    pub(super) fn acquire(&mut self) -> Result<RwLockReadGuard<'static, ()>, BackendError> {
        let ctx = self.pool.ctx;
        for _ in 0..3 {
            let gate = ctx.read_gate();
            match &self.live {
                Some(live) if live.generation == ctx.generation() => return Ok(gate),
                Some(_) => {
                    drop(gate);
                    tracing::info!(
                        worker = self.index,
                        "the PKCS#11 library was reset; reopening"
                    );
                    // Its session was closed by the reset: forget it, never close it.
                    self.live = None;
                    self.set_healthy(false);
                }
                None => drop(gate),
            }
            self.reopen()?;
        }
        Err(BackendError::Unavailable(
            "the PKCS#11 library keeps being reset; giving up for this request".into(),
        ))
    }

    /// Resets the library (if nobody did since this worker's session was opened) and drops
    /// the session, which the reset closed.
    pub(super) fn reset(&mut self, why: &str) {
        let seen = self
            .live
            .as_ref()
            .map_or_else(|| self.pool.ctx.generation(), |l| l.generation);
        self.live = None;
        self.set_healthy(false);
        match self.pool.ctx.reset(seen, why) {
            Ok(Reset::Done | Reset::AlreadyDone) => self.awaiting_reset = None,
            Ok(Reset::TooSoon) => self.awaiting_reset = Some(seen),
            Err(e) => {
                // The generation moved on before `C_Initialize` failed; the next reopen
                // initialises the library again.
                self.awaiting_reset = None;
                tracing::warn!(worker = self.index, error = %e, "PKCS#11 library reset failed");
            }
        }
    }

    /// Logs in again and forgets object handles; escalates to a reset if that fails.
    pub(super) fn relogin(&mut self) {
        let ctx = self.pool.ctx;
        let res = {
            let _g = ctx.read_gate();
            let Some(live) = self.live.as_mut() else {
                return;
            };
            if live.generation != ctx.generation() {
                // The library was reset meanwhile: the session is gone; `acquire` reopens.
                return;
            }
            live.keks.clear();
            // The session lives on: its DEK objects are destroyed (best effort; a login that
            // was lost may have taken them already), not just forgotten, so the bound holds.
            for h in live.resident.drain() {
                destroy_quietly(live, h);
            }
            ctx.login(&live.session, &self.pool.token_label, &self.pool.pin)
        };
        match res {
            Ok(()) => {}
            Err(OpError::Backend(BackendError::PinRejected(m))) => self.pin_rejected(&m),
            Err(e) => {
                let e = token::op_to_setup_error("logging in again", e);
                self.reset(&format!("re-login failed: {e}"));
            }
        }
    }

    /// Raises the alert once per process when the token refused the PIN.
    pub(super) fn pin_rejected(&self, detail: &str) {
        if !self.pool.alerted.swap(true, Ordering::AcqRel) {
            tracing::error!(
                alert = "hsm_pin_rejected",
                error = %detail,
                "the HSM refused the PIN: no further login will be tried (a real HSM locks the \
                 PIN after a few failures); the KMS stays unready until it is restarted with a \
                 correct hsm.pin_file"
            );
        }
    }

    /// Opens a new session (finding the token by label), logs in if needed and finds the
    /// current KEK. Fails fast while a previous attempt's backoff runs.
    pub(super) fn reopen(&mut self) -> Result<(), BackendError> {
        if self.pool.ctx.pin_rejected(&self.pool.token_label) {
            self.set_healthy(false);
            return Err(BackendError::Unavailable(
                "the HSM refused the PIN; restart the KMS with a correct hsm.pin_file".into(),
            ));
        }
        if let Some(b) = &self.backoff {
            let now = Instant::now();
            if now < b.retry_at {
                return Err(BackendError::Unavailable(format!(
                    "HSM unavailable, next reconnect in {} ms: {}",
                    b.retry_at.duration_since(now).as_millis(),
                    b.last_error
                )));
            }
        }
        self.set_healthy(false);
        match self.reset_then_open() {
            Ok(live) => {
                self.live = Some(live);
                self.backoff = None;
                self.set_healthy(true);
                if self
                    .pool
                    .slots
                    .iter()
                    .all(|s| s.healthy.load(Ordering::Acquire))
                {
                    self.pool.ctx.reset_pace_ok();
                }
                if self.opened_once {
                    self.pool.recoveries.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(worker = self.index, "HSM session recovered");
                }
                self.opened_once = true;
                Ok(())
            }
            Err(e) => {
                if let BackendError::PinRejected(m) = &e {
                    self.pin_rejected(m);
                }
                let delay = self
                    .backoff
                    .as_ref()
                    .map_or(FIRST_BACKOFF, |b| (b.delay * 2).min(MAX_BACKOFF));
                // Every worker retries; one of them keeps the operator informed at warn level.
                if self.index == 0 || delay == FIRST_BACKOFF {
                    tracing::warn!(
                        worker = self.index,
                        error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        "cannot open an HSM session"
                    );
                } else {
                    tracing::debug!(
                        worker = self.index,
                        error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        "cannot open an HSM session"
                    );
                }
                self.backoff = Some(Backoff {
                    retry_at: Instant::now() + delay,
                    delay,
                    last_error: e.to_string(),
                });
                if !self.opened_once {
                    return Err(e);
                }
                // A token or KEK that is not found, or a device-level failure, after start-up:
                // the library may need a rescan to see the token again.
                if matches!(
                    e,
                    BackendError::Config(_)
                        | BackendError::Unavailable(_)
                        | BackendError::KekNotFound { .. }
                ) {
                    self.reset(&format!("reopening failed: {e}"));
                }
                Err(match e {
                    BackendError::Config(m) | BackendError::PinRejected(m) => {
                        BackendError::Unavailable(m)
                    }
                    BackendError::KekNotFound { id, version } => BackendError::Unavailable(
                        format!("KEK {id} version {version} not found in the token"),
                    ),
                    other => other,
                })
            }
        }
    }

    /// Opens a session, first finishing a reset this worker is waiting for.
    pub(super) fn reset_then_open(&mut self) -> Result<Live, BackendError> {
        if let Some(seen) = self.awaiting_reset {
            if self.pool.ctx.generation() == seen {
                match self.pool.ctx.reset(seen, "a session was lost") {
                    Ok(Reset::Done | Reset::AlreadyDone) => self.awaiting_reset = None,
                    Ok(Reset::TooSoon) => {
                        return Err(BackendError::Unavailable(
                            "waiting for the PKCS#11 library reset (rate-limited)".into(),
                        ))
                    }
                    Err(e) => {
                        self.awaiting_reset = None;
                        return Err(e);
                    }
                }
            } else {
                self.awaiting_reset = None;
            }
        }
        self.open_session()
    }

    pub(super) fn open_session(&mut self) -> Result<Live, BackendError> {
        let ctx = self.pool.ctx;
        ctx.ensure_initialized()?;
        let _g = ctx.read_gate();
        let slot = token::find_slot(&ctx.pkcs11, &self.pool.token_label)?;
        let session = ctx
            .pkcs11
            .open_ro_session_no_drop(slot)
            .map_err(|e| match e {
                // At its session limit the token lost nothing: no reset (it would close every
                // other worker's session too).
                cryptoki::error::Error::Pkcs11(RvError::SessionCount, _) => {
                    tracing::warn!(
                        "the token has no session left (CKR_SESSION_COUNT): lower hsm.sessions \
                         or free sessions held by other applications"
                    );
                    BackendError::Overloaded
                }
                e => token::setup_error("opening an HSM session", e),
            })?;
        self.set_session(ctx.generation());
        let mut live = Live {
            session,
            slot,
            generation: ctx.generation(),
            keks: HashMap::new(),
            audit: None,
            binding_label: self.pool.binding_label.clone(),
            binding: None,
            legacy_until: self.pool.legacy_until,
            known: Some(Arc::clone(&self.pool)),
            resident: ResidentObjects::new(self.pool.resident_cap),
        };
        let kek = self.pool.current_kek();
        let checked = ctx
            .login(&live.session, &self.pool.token_label, &self.pool.pin)
            .and_then(|()| live.kek(&kek).map(|_| ()));
        if let Err(e) = checked {
            // The session is ours and of the current generation (we hold the gate).
            self.close(live);
            return Err(token::op_to_setup_error("preparing the HSM session", e));
        }
        tracing::debug!(worker = self.index, slot = %live.slot, "HSM session open");
        Ok(live)
    }
}
