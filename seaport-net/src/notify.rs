//! Readiness for systemd (`Type=notify` units in `contrib/systemd`): the
//! registry says `READY=1` once it accepts sessions, a service once its role
//! is registered, a proxy once it serves an instance; each says
//! `STOPPING=1` when shutdown begins. So `After=` ordering means "working",
//! not "started". Outside systemd (`NOTIFY_SOCKET` unset) nothing happens.

/// Tells systemd the process is ready (once is enough; repeats are ignored).
pub fn ready() {
    send("READY=1");
}

/// Tells systemd the process is shutting down.
pub fn stopping() {
    send("STOPPING=1");
}

fn send(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    if let Err(e) = send_to(&path, state) {
        tracing::warn!("cannot notify systemd ({}): {e}", path.to_string_lossy());
    }
}

#[cfg(target_os = "linux")]
fn send_to(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let socket = UnixDatagram::unbound()?;
    // "@name" is an abstract socket address (systemd uses both forms).
    match path.as_bytes().strip_prefix(b"@") {
        Some(name) => socket.send_to_addr(state.as_bytes(), &SocketAddr::from_abstract_name(name)?),
        None => socket.send_to(state.as_bytes(), path),
    }
    .map(|_| ())
}

#[cfg(not(target_os = "linux"))]
fn send_to(_path: &std::ffi::OsStr, _state: &str) -> std::io::Result<()> {
    Ok(())
}
