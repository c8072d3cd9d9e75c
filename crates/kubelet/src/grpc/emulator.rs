//! A kubelet emulator: registers a plugin the way the kubelet's plugin watcher does and
//! then calls the DRA service over the negotiated version.
//!
//! Registration uses a minimal raw HTTP/2 gRPC client because the kubelet (grpc-go) sends
//! the percent-encoded socket path as `:authority`, which no `http`-based client can
//! construct. The DRA socket is dialed the way [`DraDial`] says: with tonic (`localhost`,
//! like the 1.34+ kubelet's `unix:` target) or with the raw client and a percent-encoded
//! authority (kubelet 1.32/1.33, which dial the raw path, or grpc C-core clients).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use super::authority::{
    FLAG_ACK, FLAG_END_HEADERS, FLAG_END_STREAM, FLAG_PADDED, FLAG_PRIORITY, FRAME_HEADER_LEN,
    PREFACE, TYPE_CONTINUATION, TYPE_DATA, TYPE_GOAWAY, TYPE_HEADERS, TYPE_PING, TYPE_RST_STREAM,
    TYPE_SETTINGS, emit_header_block, put_frame_header,
};
use super::dra::{ClaimRef, PrepareResults, PreparedDevice, UnprepareResults};
use super::registration::{InfoRequest, PluginInfo, RegistrationStatus};
use super::{v1, v1beta1};

/// DRA service versions this emulator knows, in the kubelet's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DraVersion {
    /// `v1.DRAPlugin` (Kubernetes 1.34+).
    V1,
    /// `v1beta1.DRAPlugin` (Kubernetes 1.32+).
    V1beta1,
}

impl DraVersion {
    /// The `supported_versions` string for this version.
    pub fn as_str(self) -> &'static str {
        match self {
            DraVersion::V1 => "v1.DRAPlugin",
            DraVersion::V1beta1 => "v1beta1.DRAPlugin",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "v1.DRAPlugin" => Some(DraVersion::V1),
            "v1beta1.DRAPlugin" => Some(DraVersion::V1beta1),
            _ => None,
        }
    }
}

/// Errors of the emulator, naming the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// Connecting to a socket failed.
    #[error("connecting to {path}: {source}")]
    Connect {
        /// The Unix socket connected to.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// Reading or writing the raw HTTP/2 connection failed.
    #[error("raw HTTP/2 I/O during {step}: {source}")]
    Io {
        /// Step that failed.
        step: &'static str,
        /// The operating system's error.
        source: io::Error,
    },
    /// The peer violated HTTP/2 or gRPC framing.
    #[error("protocol error during {step}: {detail}")]
    Protocol {
        /// Step that failed.
        step: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The server reset the stream (h2 does this for an authority it rejects).
    #[error("{method}: stream reset by server with HTTP/2 error code {code}")]
    StreamReset {
        /// gRPC method path.
        method: String,
        /// HTTP/2 error code (1 = PROTOCOL_ERROR).
        code: u32,
    },
    /// The call completed with a non-zero `grpc-status`.
    #[error("{method}: grpc-status {code}: {message}")]
    GrpcStatus {
        /// gRPC method path.
        method: String,
        /// gRPC status code.
        code: i32,
        /// The `grpc-message` trailer (the server's explanation).
        message: String,
    },
    /// A call did not finish in time.
    #[error("{step} timed out after {timeout:?}")]
    Timeout {
        /// Step that timed out.
        step: &'static str,
        /// How long the step was given.
        timeout: Duration,
    },
    /// The plugin's `PluginInfo` is not acceptable to a kubelet.
    #[error("plugin rejected: {0}")]
    InvalidPluginInfo(String),
    /// Connecting tonic to the DRA endpoint failed.
    #[error("connecting to DRA endpoint {endpoint}: {source}")]
    DraConnect {
        /// DRA socket path.
        endpoint: String,
        /// tonic's transport error.
        source: tonic::transport::Error,
    },
    /// A DRA call failed with a gRPC error.
    #[error("DRA {method} ({version:?}) failed: {source}")]
    DraCall {
        /// The DRA method called (`NodePrepareResources`, …).
        method: &'static str,
        /// API version used.
        version: DraVersion,
        /// The gRPC status the plugin answered with.
        source: Box<tonic::Status>,
    },
}

/// The `:authority` grpc-go derives from a socket path: every byte outside RFC 3986's
/// unreserved set is percent-encoded (so `/` becomes `%2F`).
pub fn kubelet_authority(socket_path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut s = String::new();
    for &b in socket_path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// A minimal HTTP/2 gRPC client over a Unix socket that sends an arbitrary `:authority`.
///
/// It supports sequential unary calls on one connection (header compression state is
/// kept across calls, so later requests use dynamic-table references like grpc-go does).
pub struct RawGrpcClient {
    stream: UnixStream,
    authority: String,
    encoder: loona_hpack::Encoder<'static>,
    decoder: loona_hpack::Decoder<'static>,
    rbuf: Vec<u8>,
    next_stream_id: u32,
    timeout: Duration,
}

impl std::fmt::Debug for RawGrpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawGrpcClient")
            .field("authority", &self.authority)
            .field("next_stream_id", &self.next_stream_id)
            .finish_non_exhaustive()
    }
}

/// One received frame.
struct RawFrame {
    ty: u8,
    flags: u8,
    stream_id: u32,
    payload: Vec<u8>,
}

impl RawGrpcClient {
    /// Connects and performs the HTTP/2 handshake (preface and SETTINGS).
    pub async fn connect(
        socket: &Path,
        authority: impl Into<String>,
        timeout: Duration,
    ) -> Result<Self, EmulatorError> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(socket))
            .await
            .map_err(|_| EmulatorError::Timeout {
                step: "dial socket",
                timeout,
            })?
            .map_err(|source| EmulatorError::Connect {
                path: socket.to_path_buf(),
                source,
            })?;
        let mut client = Self {
            stream,
            authority: authority.into(),
            encoder: loona_hpack::Encoder::new(),
            decoder: loona_hpack::Decoder::new(),
            rbuf: Vec::new(),
            next_stream_id: 1,
            timeout,
        };
        let mut hello = PREFACE.to_vec();
        put_frame_header(&mut hello, 0, TYPE_SETTINGS, 0, 0);
        client.write(&hello, "send preface").await?;
        Ok(client)
    }

    async fn write(&mut self, bytes: &[u8], step: &'static str) -> Result<(), EmulatorError> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|source| EmulatorError::Io { step, source })
    }

    async fn read_frame(&mut self, step: &'static str) -> Result<RawFrame, EmulatorError> {
        loop {
            if self.rbuf.len() >= FRAME_HEADER_LEN {
                let b = &self.rbuf;
                let len = (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize;
                if b.len() >= FRAME_HEADER_LEN + len {
                    let frame = RawFrame {
                        ty: b[3],
                        flags: b[4],
                        stream_id: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
                        payload: b[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len].to_vec(),
                    };
                    self.rbuf.drain(..FRAME_HEADER_LEN + len);
                    return Ok(frame);
                }
            }
            let mut chunk = [0u8; 8192];
            let n = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|source| EmulatorError::Io { step, source })?;
            if n == 0 {
                return Err(EmulatorError::Protocol {
                    step,
                    detail: "connection closed by server".into(),
                });
            }
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Performs one unary call; `method` is the full path, e.g.
    /// `/pluginregistration.Registration/GetInfo`.
    pub async fn unary<Req: Message, Resp: Message + Default>(
        &mut self,
        method: &str,
        request: &Req,
    ) -> Result<Resp, EmulatorError> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.unary_inner(method, request))
            .await
            .map_err(|_| EmulatorError::Timeout {
                step: "unary gRPC call",
                timeout,
            })?
    }

    async fn unary_inner<Req: Message, Resp: Message + Default>(
        &mut self,
        method: &str,
        request: &Req,
    ) -> Result<Resp, EmulatorError> {
        let sid = self.next_stream_id;
        self.next_stream_id += 2;
        let headers: [(&[u8], &[u8]); 7] = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", method.as_bytes()),
            (b":authority", self.authority.as_bytes()),
            (b"content-type", b"application/grpc"),
            (
                b"user-agent",
                b"grpc-go/1.72.0 (vfio-gpu-dra kubelet emulator)",
            ),
            (b"te", b"trailers"),
        ];
        // loona's encoder indexes every header, as grpc-go's does: the second call on this
        // connection sends `:authority` as a one-byte dynamic-table reference.
        let block = self.encoder.encode(headers);
        let mut out = Vec::new();
        emit_header_block(&mut out, sid, false, &block);
        let body = request.encode_to_vec();
        let mut msg = Vec::with_capacity(5 + body.len());
        msg.push(0);
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes());
        msg.extend_from_slice(&body);
        // Registration messages are tiny: one DATA frame fits the default window and size.
        put_frame_header(&mut out, msg.len(), TYPE_DATA, FLAG_END_STREAM, sid);
        out.extend_from_slice(&msg);
        self.write(&out, "send request").await?;

        let mut data = Vec::new();
        let mut fields: HashMap<String, String> = HashMap::new();
        let mut block: Option<Vec<u8>> = None;
        let mut block_ends_stream = false;
        loop {
            let f = self.read_frame("read response").await?;
            match f.ty {
                TYPE_SETTINGS if f.flags & FLAG_ACK == 0 => {
                    let mut ack = Vec::new();
                    put_frame_header(&mut ack, 0, TYPE_SETTINGS, FLAG_ACK, 0);
                    self.write(&ack, "ack settings").await?;
                }
                TYPE_PING if f.flags & FLAG_ACK == 0 => {
                    let mut pong = Vec::new();
                    put_frame_header(&mut pong, f.payload.len(), TYPE_PING, FLAG_ACK, 0);
                    pong.extend_from_slice(&f.payload);
                    self.write(&pong, "answer ping").await?;
                }
                TYPE_GOAWAY => {
                    return Err(EmulatorError::Protocol {
                        step: "read response",
                        detail: format!("server sent GOAWAY ({} bytes)", f.payload.len()),
                    });
                }
                TYPE_RST_STREAM if f.stream_id == sid => {
                    let code = f
                        .payload
                        .get(..4)
                        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                        .unwrap_or(0);
                    return Err(EmulatorError::StreamReset {
                        method: method.to_owned(),
                        code,
                    });
                }
                TYPE_DATA if f.stream_id == sid => {
                    let payload = strip_padding(&f)?;
                    data.extend_from_slice(payload);
                    if f.flags & FLAG_END_STREAM != 0 {
                        break;
                    }
                }
                TYPE_HEADERS if f.stream_id == sid => {
                    let mut payload = strip_padding(&f)?;
                    if f.flags & FLAG_PRIORITY != 0 {
                        payload = payload.get(5..).ok_or_else(|| EmulatorError::Protocol {
                            step: "read response headers",
                            detail: "HEADERS priority exceeds payload".into(),
                        })?;
                    }
                    block_ends_stream = f.flags & FLAG_END_STREAM != 0;
                    block = Some(payload.to_vec());
                    if f.flags & FLAG_END_HEADERS != 0 {
                        self.decode_block(block.take(), &mut fields)?;
                        if block_ends_stream {
                            break;
                        }
                    }
                }
                TYPE_CONTINUATION if f.stream_id == sid => {
                    let Some(b) = block.as_mut() else {
                        return Err(EmulatorError::Protocol {
                            step: "read response headers",
                            detail: "unexpected CONTINUATION".into(),
                        });
                    };
                    b.extend_from_slice(&f.payload);
                    if f.flags & FLAG_END_HEADERS != 0 {
                        self.decode_block(block.take(), &mut fields)?;
                        if block_ends_stream {
                            break;
                        }
                    }
                }
                // WINDOW_UPDATE, acks and frames of other streams need no action here.
                _ => {}
            }
        }
        // DATA with END_STREAM but no trailers is a protocol violation for gRPC; the
        // missing grpc-status is reported below.
        let status = fields
            .get("grpc-status")
            .ok_or_else(|| EmulatorError::Protocol {
                step: "read response trailers",
                detail: format!("no grpc-status (headers: {fields:?})"),
            })?;
        let code: i32 = status.parse().map_err(|_| EmulatorError::Protocol {
            step: "read response trailers",
            detail: format!("invalid grpc-status {status:?}"),
        })?;
        if code != 0 {
            return Err(EmulatorError::GrpcStatus {
                method: method.to_owned(),
                code,
                message: fields.get("grpc-message").cloned().unwrap_or_default(),
            });
        }
        if data.len() < 5 || data[0] != 0 {
            return Err(EmulatorError::Protocol {
                step: "decode response message",
                detail: format!("bad gRPC message prefix ({} bytes)", data.len()),
            });
        }
        let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
        let body = data
            .get(5..5 + len)
            .ok_or_else(|| EmulatorError::Protocol {
                step: "decode response message",
                detail: "truncated gRPC message".into(),
            })?;
        Resp::decode(body).map_err(|e| EmulatorError::Protocol {
            step: "decode response message",
            detail: e.to_string(),
        })
    }

    fn decode_block(
        &mut self,
        block: Option<Vec<u8>>,
        fields: &mut HashMap<String, String>,
    ) -> Result<(), EmulatorError> {
        let block = block.unwrap_or_default();
        let decoded = self
            .decoder
            .decode(&block)
            .map_err(|e| EmulatorError::Protocol {
                step: "decode response headers",
                detail: e.to_string(),
            })?;
        for (n, v) in decoded {
            fields.insert(
                String::from_utf8_lossy(&n).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            );
        }
        Ok(())
    }

    /// Calls `GetInfo`.
    pub async fn get_info(&mut self) -> Result<PluginInfo, EmulatorError> {
        self.unary("/pluginregistration.Registration/GetInfo", &InfoRequest {})
            .await
    }

    /// Calls `NotifyRegistrationStatus`.
    pub async fn notify_registration_status(
        &mut self,
        plugin_registered: bool,
        error: impl Into<String>,
    ) -> Result<(), EmulatorError> {
        let req = RegistrationStatus {
            plugin_registered,
            error: error.into(),
        };
        let _: super::registration::RegistrationStatusResponse = self
            .unary(
                "/pluginregistration.Registration/NotifyRegistrationStatus",
                &req,
            )
            .await?;
        Ok(())
    }
}

fn strip_padding(f: &RawFrame) -> Result<&[u8], EmulatorError> {
    if f.flags & FLAG_PADDED == 0 {
        return Ok(&f.payload);
    }
    let pad = *f.payload.first().unwrap_or(&0) as usize;
    f.payload
        .get(1..f.payload.len().saturating_sub(pad))
        .ok_or_else(|| EmulatorError::Protocol {
            step: "read response",
            detail: "padding exceeds frame".into(),
        })
}

/// How the emulated kubelet dials the DRA endpoint, which decides its `:authority`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DraDial {
    /// `unix:` + endpoint (kubelet 1.34+): grpc-go sends `localhost`.
    #[default]
    UnixScheme,
    /// The raw endpoint path as target (kubelet 1.32/1.33, and the 1.34+ re-dial after a
    /// shutdown): grpc-go sends the percent-encoded path, see [`kubelet_authority`].
    RawPath,
    /// A fixed authority, e.g. grpc C-core's relative `tmp%2F…%2Fdra.sock`.
    Authority(String),
}

/// Emulates the kubelet's plugin watcher and DRA manager for one registration socket.
#[derive(Debug, Clone)]
pub struct KubeletEmulator {
    registration_socket: PathBuf,
    authority: String,
    dra_dial: DraDial,
    known_versions: Vec<DraVersion>,
    timeout: Duration,
}

impl KubeletEmulator {
    /// An emulator for the plugin whose registration socket is at `registration_socket`,
    /// sending the kubelet's percent-encoded authority and knowing v1 and v1beta1.
    pub fn new(registration_socket: impl Into<PathBuf>) -> Self {
        let registration_socket = registration_socket.into();
        Self {
            authority: kubelet_authority(&registration_socket),
            registration_socket,
            dra_dial: DraDial::default(),
            known_versions: vec![DraVersion::V1, DraVersion::V1beta1],
            timeout: Duration::from_secs(10),
        }
    }

    /// Overrides the `:authority` sent on the registration socket.
    pub fn with_authority(mut self, authority: impl Into<String>) -> Self {
        self.authority = authority.into();
        self
    }

    /// Sets how the DRA endpoint is dialed (and so the `:authority` sent on it).
    pub fn with_dra_dial(mut self, dial: DraDial) -> Self {
        self.dra_dial = dial;
        self
    }

    /// Restricts the DRA versions this "kubelet" knows (e.g. only v1beta1 for 1.32/1.33).
    pub fn with_known_versions(mut self, versions: Vec<DraVersion>) -> Self {
        self.known_versions = versions;
        self
    }

    /// Sets the per-step timeout (dial, each registration call).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Opens the raw registration connection with the configured authority.
    pub async fn connect_registration(&self) -> Result<RawGrpcClient, EmulatorError> {
        RawGrpcClient::connect(&self.registration_socket, &self.authority, self.timeout).await
    }

    /// Validates `PluginInfo` like the kubelet and picks the version: the first entry of the
    /// plugin's list that the kubelet knows.
    pub fn choose_version(&self, info: &PluginInfo) -> Result<DraVersion, EmulatorError> {
        if info.r#type != super::registration::DRA_PLUGIN_TYPE {
            return Err(EmulatorError::InvalidPluginInfo(format!(
                "type {:?} is not DRAPlugin",
                info.r#type
            )));
        }
        if info.name.is_empty() {
            return Err(EmulatorError::InvalidPluginInfo("empty driver name".into()));
        }
        info.supported_versions
            .iter()
            .filter_map(|v| DraVersion::parse(v))
            .find(|v| self.known_versions.contains(v))
            .ok_or_else(|| {
                EmulatorError::InvalidPluginInfo(format!(
                    "no supported version in {:?}",
                    info.supported_versions
                ))
            })
    }

    /// Registers the plugin (GetInfo, validate, NotifyRegistrationStatus(true)) and connects
    /// to its DRA endpoint.
    pub async fn register(&self) -> Result<RegisteredPlugin, EmulatorError> {
        let mut reg = self.connect_registration().await?;
        let info = reg.get_info().await?;
        let version = match self.choose_version(&info) {
            Ok(v) => v,
            Err(e) => {
                // Tell the plugin, as the kubelet does, before giving up.
                let _ = reg.notify_registration_status(false, e.to_string()).await;
                return Err(e);
            }
        };
        let endpoint = if info.endpoint.is_empty() {
            self.registration_socket.to_string_lossy().into_owned()
        } else {
            info.endpoint.clone()
        };
        let transport = match &self.dra_dial {
            DraDial::UnixScheme => DraTransport::Tonic(connect_dra(&endpoint).await?),
            dial => {
                let authority = match dial {
                    DraDial::Authority(a) => a.clone(),
                    _ => kubelet_authority(Path::new(&endpoint)),
                };
                let raw =
                    RawGrpcClient::connect(Path::new(&endpoint), authority, self.timeout).await?;
                DraTransport::Raw(Arc::new(tokio::sync::Mutex::new(raw)))
            }
        };
        reg.notify_registration_status(true, "").await?;
        Ok(RegisteredPlugin {
            info,
            version,
            transport,
        })
    }
}

/// Connects a tonic channel to a DRA socket (sends `:authority: localhost`).
pub async fn connect_dra(endpoint: &str) -> Result<Channel, EmulatorError> {
    let path = PathBuf::from(endpoint);
    let err = |source| EmulatorError::DraConnect {
        endpoint: endpoint.to_owned(),
        source,
    };
    // The URI is only a placeholder: the connector ignores it and dials the socket.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(err)
}

/// A plugin registered with the emulator, ready for DRA calls.
#[derive(Debug, Clone)]
pub struct RegisteredPlugin {
    /// What the plugin answered to `GetInfo`.
    pub info: PluginInfo,
    /// Version negotiated from the plugin's list.
    pub version: DraVersion,
    transport: DraTransport,
}

/// The connection DRA calls go over.
#[derive(Debug, Clone)]
enum DraTransport {
    /// tonic: `:authority: localhost`.
    Tonic(Channel),
    /// The raw client, for authorities tonic cannot send; calls take turns.
    Raw(Arc<tokio::sync::Mutex<RawGrpcClient>>),
}

impl DraTransport {
    /// One unary call of `path`, e.g. `/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources`.
    async fn unary<Req, Resp>(
        &self,
        path: &'static str,
        method: &'static str,
        version: DraVersion,
        request: Req,
    ) -> Result<Resp, EmulatorError>
    where
        Req: Message + Send + Sync + 'static,
        Resp: Message + Default + Send + Sync + 'static,
    {
        let call_err = |s: tonic::Status| EmulatorError::DraCall {
            method,
            version,
            source: Box::new(s),
        };
        match self {
            DraTransport::Tonic(channel) => {
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                grpc.ready()
                    .await
                    .map_err(|e| call_err(tonic::Status::unavailable(e.to_string())))?;
                let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
                grpc.unary(
                    tonic::Request::new(request),
                    http::uri::PathAndQuery::from_static(path),
                    codec,
                )
                .await
                .map(tonic::Response::into_inner)
                .map_err(call_err)
            }
            DraTransport::Raw(raw) => raw.lock().await.unary(path, &request).await,
        }
    }
}

impl RegisteredPlugin {
    /// Prepares claims over the negotiated version.
    pub async fn prepare(&self, claims: &[ClaimRef]) -> Result<PrepareResults, EmulatorError> {
        self.prepare_with(self.version, claims).await
    }

    /// Unprepares claims over the negotiated version.
    pub async fn unprepare(&self, claims: &[ClaimRef]) -> Result<UnprepareResults, EmulatorError> {
        self.unprepare_with(self.version, claims).await
    }

    /// Prepares claims over an explicit version. Requests and answers are v1 messages;
    /// for v1beta1 they pass through the same `From` conversions the server uses.
    pub async fn prepare_with(
        &self,
        version: DraVersion,
        claims: &[ClaimRef],
    ) -> Result<PrepareResults, EmulatorError> {
        const METHOD: &str = "NodePrepareResources";
        let req = v1::NodePrepareResourcesRequest {
            claims: claims.iter().map(claim_v1).collect(),
        };
        let t = &self.transport;
        let resp: v1::NodePrepareResourcesResponse = match version {
            DraVersion::V1 => {
                t.unary(
                    "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources",
                    METHOD,
                    version,
                    req,
                )
                .await?
            }
            DraVersion::V1beta1 => t
                .unary::<_, v1beta1::NodePrepareResourcesResponse>(
                    "/k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodePrepareResources",
                    METHOD,
                    version,
                    v1beta1::NodePrepareResourcesRequest::from(req),
                )
                .await?
                .into(),
        };
        Ok(resp
            .claims
            .into_iter()
            .map(|(uid, r)| {
                let entry = if r.error.is_empty() {
                    Ok(r.devices
                        .into_iter()
                        .map(|d| PreparedDevice {
                            request_names: d.request_names,
                            pool_name: d.pool_name,
                            device_name: d.device_name,
                            cdi_device_ids: d.cdi_device_ids,
                            share_id: d.share_id,
                        })
                        .collect())
                } else {
                    Err(r.error)
                };
                (uid, entry)
            })
            .collect())
    }

    /// Unprepares claims over an explicit version (v1 messages, converted for v1beta1).
    pub async fn unprepare_with(
        &self,
        version: DraVersion,
        claims: &[ClaimRef],
    ) -> Result<UnprepareResults, EmulatorError> {
        const METHOD: &str = "NodeUnprepareResources";
        let req = v1::NodeUnprepareResourcesRequest {
            claims: claims.iter().map(claim_v1).collect(),
        };
        let t = &self.transport;
        let resp: v1::NodeUnprepareResourcesResponse = match version {
            DraVersion::V1 => {
                t.unary(
                    "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodeUnprepareResources",
                    METHOD,
                    version,
                    req,
                )
                .await?
            }
            DraVersion::V1beta1 => t
                .unary::<_, v1beta1::NodeUnprepareResourcesResponse>(
                    "/k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodeUnprepareResources",
                    METHOD,
                    version,
                    v1beta1::NodeUnprepareResourcesRequest::from(req),
                )
                .await?
                .into(),
        };
        Ok(resp
            .claims
            .into_iter()
            .map(|(uid, r)| {
                let entry = if r.error.is_empty() {
                    Ok(())
                } else {
                    Err(r.error)
                };
                (uid, entry)
            })
            .collect())
    }
}

fn claim_v1(c: &ClaimRef) -> v1::Claim {
    v1::Claim {
        namespace: c.namespace.clone(),
        uid: c.uid.clone(),
        name: c.name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_like_grpc_go() {
        assert_eq!(
            kubelet_authority(Path::new(
                "/var/lib/kubelet/plugins_registry/gpu.example.com-reg.sock"
            )),
            "%2Fvar%2Flib%2Fkubelet%2Fplugins_registry%2Fgpu.example.com-reg.sock"
        );
    }

    #[test]
    fn version_choice_follows_plugin_order() {
        let info = |v: &[&str]| PluginInfo {
            r#type: "DRAPlugin".into(),
            name: "d".into(),
            endpoint: "/x".into(),
            supported_versions: v.iter().map(|s| s.to_string()).collect(),
        };
        let e = KubeletEmulator::new("/r.sock");
        assert_eq!(
            e.choose_version(&info(&["v1.DRAPlugin", "v1beta1.DRAPlugin"]))
                .unwrap(),
            DraVersion::V1
        );
        assert_eq!(
            e.choose_version(&info(&["x", "v1beta1.DRAPlugin", "v1.DRAPlugin"]))
                .unwrap(),
            DraVersion::V1beta1
        );
        let old = e.clone().with_known_versions(vec![DraVersion::V1beta1]);
        assert_eq!(
            old.choose_version(&info(&["v1.DRAPlugin", "v1beta1.DRAPlugin"]))
                .unwrap(),
            DraVersion::V1beta1
        );
        assert!(e.choose_version(&info(&[])).is_err());
    }
}
