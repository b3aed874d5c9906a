//! Feature `tokio`: the guard's listener handed to a tokio runtime, made
//! non-blocking first and refused outside a runtime with an error instead of
//! tokio's panic.

use std::os::unix::net::UnixListener;
use std::path::Path;

use crate::error::{io_at, LifecycleError, Result};

/// Takes the listener out of `slot` as a `tokio::net::UnixListener`.
///
/// Every check that can fail without consuming the listener comes first, so
/// on [`LifecycleError::NoRuntime`] (and on a failed `fcntl(2)`) it is still
/// in the guard.
pub(crate) fn take(
    slot: &mut Option<UnixListener>,
    socket_path: &Path,
) -> Result<tokio::net::UnixListener> {
    if slot.is_none() {
        return Err(LifecycleError::InvalidArgument {
            what: "listener",
            reason: format!(
                "the listener for {} was already taken out of the guard",
                socket_path.display()
            ),
        });
    }
    // `from_std` panics outside a runtime; ask first.
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(LifecycleError::NoRuntime);
    }
    let listener = slot.take().expect("checked above");
    // tokio needs O_NONBLOCK and, since 1.44, panics in debug builds on a
    // descriptor without it. It is a flag of the open file description, so
    // a `try_clone` of the listener made earlier turns non-blocking too.
    // FD_CLOEXEC is a flag of the descriptor, set at creation: kept.
    if let Err(e) = listener.set_nonblocking(true) {
        *slot = Some(listener);
        return Err(io_at("set O_NONBLOCK on socket", socket_path, e));
    }
    tokio::net::UnixListener::from_std(listener)
        .map_err(|e| io_at("register with tokio the socket", socket_path, e))
}
