//! SIGINT and SIGTERM as one future, for clean shutdowns; SIGHUP as a
//! stream of reload requests.
//!
//! Invariant: a handler is installed before its future first runs, so a
//! signal that arrives early is never taken by the default action.

/// Calls `reload` on every SIGHUP, for ever (a task's whole job). The
/// handler is installed by this call, before the returned future first
/// runs: a SIGHUP just after start is a reload, never the default action
/// (which ends the process). Call it inside the runtime.
pub fn on_hangup(mut reload: impl FnMut() + Send + 'static) -> impl std::future::Future<Output = ()> + Send {
    #[cfg(unix)]
    let hup = {
        use tokio::signal::unix::{SignalKind, signal};
        signal(SignalKind::hangup()).map_err(|e| tracing::warn!("cannot watch SIGHUP: {e}")).ok()
    };
    async move {
        #[cfg(unix)]
        if let Some(mut hup) = hup {
            while hup.recv().await.is_some() {
                reload();
            }
        }
        #[cfg(not(unix))]
        let _ = &mut reload;
        std::future::pending::<()>().await;
    }
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
