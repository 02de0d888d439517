//! SIGINT and SIGTERM as one future, for clean shutdowns; SIGHUP as a
//! stream of reload requests.

/// Calls `reload` on every SIGHUP, for ever (a task's whole job).
pub async fn on_hangup(mut reload: impl FnMut()) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                while hup.recv().await.is_some() {
                    reload();
                }
            }
            Err(e) => tracing::warn!("cannot watch SIGHUP: {e}"),
        }
    }
    #[cfg(not(unix))]
    let _ = &mut reload;
    std::future::pending::<()>().await;
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
