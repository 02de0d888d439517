//! The one place the binaries read the time: tokio's clock, handed to the
//! sans-io state machines as a `std::time::Instant`. Reading it through tokio
//! means a test with a paused clock (`tokio::time::pause`) drives a driver's
//! timers and its state machine's idea of "now" together.

/// Now, by tokio's clock.
pub fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}
