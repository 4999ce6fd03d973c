//! What every handler of both APIs gets: the service and the HTTP settings.

use std::sync::Arc;

use super::HttpOptions;
use crate::service::MessageService;

/// What every handler gets.
#[derive(Debug, Clone)]
pub struct RouterState {
    pub(in crate::http) service: Arc<MessageService>,
    pub(in crate::http) opts: Arc<HttpOptions>,
}
