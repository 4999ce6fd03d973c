//! Route templates from a route table: the label of a request path (`/v1/threads/{id}`,
//! never the raw path), found with the same matcher axum routes with (`matchit`), so the
//! metric labels and any per-route class are derived from the one table a router is built
//! from and cannot drift from it.

/// The templates of one route table, each with a value (a class, or `()`).
#[derive(Debug, Clone)]
pub struct Templates<V: Clone> {
    matcher: matchit::Router<(&'static str, V)>,
}

impl<V: Clone> Templates<V> {
    /// The templates of `table` (axum syntax: `/a/{id}`, `/a/{*rest}`).
    ///
    /// # Panics
    /// When two templates conflict, as axum's router would when built from the same table:
    /// a programming error that every test run would show at once.
    pub fn new(table: impl IntoIterator<Item = (&'static str, V)>) -> Self {
        let mut matcher = matchit::Router::new();
        for (path, v) in table {
            #[allow(clippy::panic)]
            if let Err(e) = matcher.insert(path, (path, v)) {
                panic!("route table: {path}: {e}");
            }
        }
        Self { matcher }
    }

    /// The template `path` matches and its value, if any.
    pub fn of(&self, path: &str) -> Option<(&'static str, &V)> {
        self.matcher.at(path).ok().map(|m| (m.value.0, &m.value.1))
    }
}
