//! The two transports of the one ICheckpoint object: kernel binder registered with the service
//! manager (Android's servicemanager, or rsb_hub on Linux), and binder RPC on a Unix socket
//! for hosts without kernel binder. All rsbinder bootstrap code lives here (the glue that
//! differs from AOSP's libbinder_rs).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rsbinder::entry::{Endpoint, KernelEndpoint, ServerGuard, Uri};
use rsbinder::SIBinder;

use crate::config::{BinderConfig, SocketConfig};

/// A transport that could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Kernel binder: ProcessState or the service-manager registration failed.
    #[error(
        "cannot serve {service} on kernel binder{driver}: {message} (is the binder driver \
         present and the service manager running? Without kernel binder set [binder] enabled = \
         false and [socket] path)"
    )]
    Kernel {
        /// The service name.
        service: String,
        /// " (driver /dev/...)" or "".
        driver: String,
        /// rsbinder's error.
        message: String,
    },
    /// The RPC socket could not be created.
    #[error("cannot serve on socket {path}: {message}")]
    Socket {
        /// The socket path.
        path: String,
        /// Why.
        message: String,
    },
}

/// Registers `binder` with the service manager and starts the binder thread pool.
pub fn serve_kernel(
    binder: SIBinder,
    config: &BinderConfig,
) -> Result<ServerGuard, TransportError> {
    let mut endpoint = KernelEndpoint::default();
    if let Some(driver) = &config.driver {
        endpoint = endpoint.with_driver(driver);
    }
    let error = |message: String| TransportError::Kernel {
        service: config.service_name.clone(),
        driver: config
            .driver
            .as_ref()
            .map_or(String::new(), |d| format!(" (driver {})", d.display())),
        message,
    };
    let guard = rsbinder::serve(Uri::from(endpoint))
        .and_then(|server| server.add(&config.service_name, binder))
        .map_err(|e| error(format!("{e:?}")))?
        .spawn()
        .map_err(|e| error(format!("{e:?}")))?;
    log::info!("serving {} on kernel binder", config.service_name);
    Ok(guard)
}

/// Serves `binder` as the root object of a binder RPC server on the Unix socket of `config`.
pub fn serve_socket(
    binder: SIBinder,
    path: &Path,
    config: &SocketConfig,
) -> Result<ServerGuard, TransportError> {
    let error =
        |message: String| TransportError::Socket { path: path.display().to_string(), message };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| error(format!("cannot create folder: {e}")))?;
    }
    let guard = rsbinder::serve(checkpoint_aidl::socket_uri(path))
        .and_then(|server| server.add(checkpoint_aidl::SERVICE_NAME, binder))
        .map_err(|e| error(format!("{e:?}")))?
        .spawn()
        .map_err(|e| error(format!("{e:?}")))?;
    let mode = config.mode.unwrap_or(0o666);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| error(format!("cannot set mode {mode:#o}: {e}")))?;
    log::info!(
        "serving {} on socket {} (mode {mode:#o})",
        checkpoint_aidl::SERVICE_NAME,
        path.display()
    );
    Ok(guard)
}

/// The client side: the URI of the service on kernel binder or on a socket.
pub fn service_uri(socket: Option<&Path>) -> Uri {
    match socket {
        Some(path) => checkpoint_aidl::socket_uri(path).with_service(checkpoint_aidl::SERVICE_NAME),
        None => Endpoint::kernel().with_service(checkpoint_aidl::SERVICE_NAME),
    }
}
