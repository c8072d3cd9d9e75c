//! HTTP routing: discovery documents, the REST verbs on each resource, and
//! watch streams. Every failure becomes a `Status` response, never a panic.

use crate::RecordedRequest;
use crate::store::{ApiError, Change, EventKind, RESOURCES, ResourceType, Store, by_plural};
use crate::util::{Filter, json_patch, merge_patch, meta_str, parse_query, url_decode};
use bytes::Bytes;
use futures::StreamExt;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Largest accepted request body; the real server's limit is 3 MiB.
const MAX_BODY: usize = 3 * 1024 * 1024;

/// Response body: either a complete JSON document or a watch stream.
pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// State shared by the handle, the accept loop and every request.
pub(crate) struct Shared {
    pub store: Mutex<Store>,
    pub unavailable: AtomicBool,
    pub refuse: AtomicBool,
    /// `resource.k8s.io/v1` is served (off: a pre-1.34 server).
    pub resource_v1: AtomicBool,
    /// ResourceSlice writes drop `spec.devices[].taints` (a gate that is off).
    pub prune_device_taints: AtomicBool,
    pub log: Mutex<Vec<RecordedRequest>>,
    /// Bumped to end all open watch streams (outage, shutdown).
    pub disrupt: watch::Sender<u64>,
    pub bookmark_ms: AtomicU64,
    pub addr: SocketAddr,
    /// Single-object GETs of these resources (plural) wait this long first.
    pub get_delay: Mutex<HashMap<String, Duration>>,
}

impl Shared {
    /// Locks the store; a poisoned lock is still usable because every
    /// mutation is completed before anything can panic.
    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn log(&self) -> MutexGuard<'_, Vec<RecordedRequest>> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn disrupt_watches(&self) {
        self.disrupt.send_modify(|n| *n += 1);
    }
}

fn json_response(code: u16, value: &Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error_response(err: &ApiError) -> Response<Body> {
    json_response(err.code, &err.to_status())
}

fn not_found() -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

fn is_true(v: Option<&str>) -> bool {
    matches!(v, Some("true" | "1"))
}

/// Entry point for every request on every connection. Returning `Err`
/// makes hyper drop the connection, which is how "refuse connections"
/// also cuts keep-alive connections that were already open.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    if shared.refuse.load(Ordering::SeqCst) {
        return Err(std::io::Error::other(
            "fake apiserver is refusing connections",
        ));
    }
    shared.log().push(RecordedRequest {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
        query: req.uri().query().unwrap_or("").to_owned(),
    });
    if let Some(delay) = get_delay(&shared, &req) {
        tokio::time::sleep(delay).await;
    }
    if shared.unavailable.load(Ordering::SeqCst) {
        let err = ApiError::new(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        );
        return Ok(error_response(&err));
    }
    Ok(route(&shared, req)
        .await
        .unwrap_or_else(|e| error_response(&e)))
}

/// The delay set for `req` when it GETs one object (`.../<plural>/<name>`, not a
/// subresource, list or watch) of a resource with a delay.
fn get_delay(shared: &Shared, req: &Request<Incoming>) -> Option<Duration> {
    if req.method() != Method::GET {
        return None;
    }
    let delays = shared
        .get_delay
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if delays.is_empty() {
        return None;
    }
    let segs: Vec<&str> = req
        .uri()
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match segs.as_slice() {
        [.., plural, _name] => delays.get(*plural).copied(),
        _ => None,
    }
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let segs: Vec<String> = req
        .uri()
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .map(url_decode)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let get = req.method() == Method::GET;
    let resource_v1 = shared.resource_v1.load(Ordering::SeqCst);
    if !resource_v1 && segs.starts_with(&["apis", "resource.k8s.io"]) {
        return Err(not_found());
    }
    match segs.as_slice() {
        ["version"] if get => Ok(json_response(200, &version())),
        ["healthz" | "readyz" | "livez"] if get => {
            Ok(Response::new(Full::new(Bytes::from_static(b"ok")).boxed()))
        }
        ["api"] if get => Ok(json_response(
            200,
            &json!({"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                    "serverAddress": shared.addr.to_string()}]}),
        )),
        ["apis"] if get => Ok(json_response(
            200,
            &json!({"kind": "APIGroupList", "apiVersion": "v1",
                    "groups": if resource_v1 { vec![api_group()] } else { vec![] }}),
        )),
        ["apis", "resource.k8s.io"] if get => Ok(json_response(200, &api_group())),
        ["api", "v1"] if get => Ok(json_response(200, &resource_list(""))),
        ["apis", "resource.k8s.io", "v1"] if get => {
            Ok(json_response(200, &resource_list("resource.k8s.io")))
        }
        ["api", "v1", rest @ ..] => resource(shared, "", rest, req).await,
        ["apis", group, "v1", rest @ ..] => resource(shared, group, rest, req).await,
        _ => Err(not_found()),
    }
}

fn version() -> Value {
    json!({
        "major": "1", "minor": "34", "gitVersion": "v1.34.0-fake",
        "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
        "buildDate": "2025-08-27T00:00:00Z", "goVersion": "go1.24.6", "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn api_group() -> Value {
    let v = json!({"groupVersion": "resource.k8s.io/v1", "version": "v1"});
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": "resource.k8s.io",
           "versions": [v.clone()], "preferredVersion": v})
}

fn resource_list(group: &str) -> Value {
    let verbs = [
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    ];
    let mut resources = Vec::new();
    for rt in RESOURCES.iter().filter(|r| r.group == group) {
        resources.push(json!({"name": rt.plural, "singularName": rt.singular,
                              "namespaced": rt.namespaced, "kind": rt.kind, "verbs": verbs}));
        if rt.status {
            resources.push(
                json!({"name": format!("{}/status", rt.plural), "singularName": "",
                                  "namespaced": rt.namespaced, "kind": rt.kind,
                                  "verbs": ["get", "patch", "update"]}),
            );
        }
    }
    let gv = if group.is_empty() {
        "v1".to_owned()
    } else {
        format!("{group}/v1")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::new(
            413,
            "RequestEntityTooLarge",
            "the request body is too large",
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "reading the request body: {e}"
        ))),
    }
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON in the request body: {e}")))
}

async fn resource(
    shared: &Arc<Shared>,
    group: &str,
    rest: &[&str],
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(*ns), rest),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(*n), None),
        [p, n, s] => (*p, Some(*n), Some(*s)),
        _ => return Err(not_found()),
    };
    let rt = by_plural(group, plural).ok_or_else(not_found)?;
    let status = match sub {
        None => false,
        Some("status") if rt.status => true,
        Some(_) => return Err(not_found()),
    };
    let method = req.method().clone();
    if ns.is_some() && !rt.namespaced {
        return Err(not_found());
    }
    // Namespaced resources are only listed/watched across namespaces.
    if rt.namespaced && ns.is_none() && !(method == Method::GET && name.is_none()) {
        return Err(if name.is_some() {
            not_found()
        } else {
            ApiError::new(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )
        });
    }
    let ns_str = ns.unwrap_or("");
    let query = parse_query(req.uri().query().unwrap_or(""));
    let q = |k: &str| {
        query
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let filter = || {
        Filter::parse(
            ns.map(str::to_owned),
            q("fieldSelector"),
            q("labelSelector"),
            rt.fields,
        )
        .map_err(ApiError::bad_request)
    };
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap_or("")
        .trim()
        .to_owned();
    match (method, name) {
        (Method::GET, None) if is_true(q("watch")) => start_watch(shared, rt, filter()?, &q),
        (Method::GET, None) => list(&shared.store(), rt, &filter()?, &q),
        (Method::GET, Some(n)) => shared
            .store()
            .get(rt, ns_str, n)
            .map(|o| json_response(200, o))
            .ok_or_else(|| ApiError::not_found(rt, n)),
        (Method::POST, None) => {
            let mut obj = parse_json(&read_body(req).await?)?;
            prune_disabled_fields(shared, rt, &mut obj);
            if q("dryRun").is_some() {
                // Admitted and defaulted, never stored: the object as it would be.
                return Ok(json_response(201, &dry_run_created(obj)));
            }
            let created = shared.store().create(rt, ns_str, obj, false)?;
            Ok(json_response(201, &created))
        }
        (Method::PUT, Some(n)) => {
            let mut obj = parse_json(&read_body(req).await?)?;
            prune_disabled_fields(shared, rt, &mut obj);
            let updated = shared.store().update(rt, ns_str, n, obj, status)?;
            Ok(json_response(200, &updated))
        }
        (Method::PATCH, Some(n)) => {
            let body = read_body(req).await?;
            patch(
                &mut shared.store(),
                rt,
                ns_str,
                n,
                status,
                &content_type,
                &body,
            )
        }
        (Method::DELETE, Some(n)) => {
            let body = read_body(req).await?;
            let opts = if body.iter().all(u8::is_ascii_whitespace) {
                json!({})
            } else {
                parse_json(&body)?
            };
            let pre = opts.get("preconditions");
            let pre = |k: &str| pre.and_then(|p| p.get(k)).and_then(Value::as_str);
            let (obj, gone) =
                shared
                    .store()
                    .delete(rt, ns_str, n, pre("uid"), pre("resourceVersion"))?;
            if !gone {
                // Finalizers pending: the object stays, marked for deletion.
                return Ok(json_response(202, &obj));
            }
            Ok(json_response(
                200,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                        "details": {"name": n, "group": rt.group, "kind": rt.plural,
                                    "uid": meta_str(&obj, "uid")}}),
            ))
        }
        (Method::DELETE, None) => {
            let filter = filter()?;
            let mut store = shared.store();
            let targets: Vec<(String, String)> = store
                .iter(rt)
                .filter(|o| filter.matches(o))
                .map(|o| {
                    let m = |f| meta_str(o, f).unwrap_or("").to_owned();
                    (m("namespace"), m("name"))
                })
                .collect();
            let mut items = Vec::new();
            for (ns, name) in targets {
                items.push(store.delete(rt, &ns, &name, None, None)?.0);
            }
            Ok(json_response(
                200,
                &list_body(rt, items, json!({"resourceVersion": store.rv.to_string()})),
            ))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )),
    }
}

/// Drops what a server with a feature gate off drops from a write:
/// `spec.devices[].taints` of ResourceSlices when `DRADeviceTaints` is off.
fn prune_disabled_fields(shared: &Shared, rt: &ResourceType, obj: &mut Value) {
    if rt.plural != "resourceslices" || !shared.prune_device_taints.load(Ordering::SeqCst) {
        return;
    }
    let devices = obj
        .pointer_mut("/spec/devices")
        .and_then(Value::as_array_mut);
    for d in devices.into_iter().flatten() {
        if let Some(d) = d.as_object_mut() {
            d.remove("taints");
        }
    }
}

/// A dry-run create's answer: the object with the name `generateName` would
/// give it, nothing stored.
fn dry_run_created(mut obj: Value) -> Value {
    let generated = obj
        .pointer("/metadata/generateName")
        .and_then(Value::as_str)
        .map(|p| format!("{p}dryrun"));
    if let (Some(name), Some(meta)) = (
        generated,
        obj.get_mut("metadata").and_then(Value::as_object_mut),
    ) {
        meta.entry("name").or_insert(Value::String(name));
    }
    obj
}

fn list_body(rt: &ResourceType, items: Vec<Value>, metadata: Value) -> Value {
    json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(),
           "metadata": metadata, "items": items})
}

fn list<'q>(
    store: &Store,
    rt: &ResourceType,
    filter: &Filter,
    q: &impl Fn(&str) -> Option<&'q str>,
) -> Result<Response<Body>, ApiError> {
    let limit = q("limit")
        .map(|l| {
            l.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))
        })
        .transpose()?
        .filter(|l| *l > 0);
    // The continue token is "<namespace>/<name>" of the last item returned;
    // comparing as a tuple matches the store's (namespace, name) order.
    let after = q("continue").map(|t| t.split_once('/').unwrap_or(("", t)));
    fn key(o: &Value) -> (&str, &str) {
        (
            meta_str(o, "namespace").unwrap_or(""),
            meta_str(o, "name").unwrap_or(""),
        )
    }
    let mut items: Vec<&Value> = store
        .iter(rt)
        .filter(|o| filter.matches(o) && after.is_none_or(|a| key(o) > a))
        .collect();
    let mut metadata = json!({"resourceVersion": store.rv.to_string()});
    if let Some(limit) = limit
        && items.len() > limit
    {
        let remaining = items.len() - limit;
        items.truncate(limit);
        if let (Some(last), Some(m)) = (items.last(), metadata.as_object_mut()) {
            let (ns, name) = key(last);
            m.insert("continue".into(), format!("{ns}/{name}").into());
            m.insert("remainingItemCount".into(), remaining.into());
        }
    }
    let items = items.into_iter().cloned().collect();
    Ok(json_response(200, &list_body(rt, items, metadata)))
}

fn patch(
    store: &mut Store,
    rt: &'static ResourceType,
    ns: &str,
    name: &str,
    status: bool,
    content_type: &str,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    let current = store.get(rt, ns, name).cloned();
    let apply = content_type == "application/apply-patch+yaml";
    let mut patched = match current {
        Some(c) => c,
        // Server-side apply creates missing objects; other patches don't.
        None if apply && !status => json!({}),
        None => return Err(ApiError::not_found(rt, name)),
    };
    match content_type {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            merge_patch(&mut patched, &parse_json(body)?);
        }
        "application/json-patch+json" => {
            json_patch(&mut patched, &parse_json(body)?)
                .map_err(|e| ApiError::new(422, "Invalid", e))?;
        }
        // Approximation: apply is treated as a merge patch (no field
        // ownership, no pruning of fields the manager stopped setting).
        "application/apply-patch+yaml" => {
            let body = serde_json::from_slice::<Value>(body).map_err(|_| {
                ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    "only JSON-encoded apply patches are supported",
                )
            })?;
            merge_patch(&mut patched, &body);
        }
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"
                ),
            ));
        }
    }
    if store.get(rt, ns, name).is_none() {
        if let Some(meta) = patched.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("name".into(), name.into());
        }
        return Ok(json_response(201, &store.create(rt, ns, patched, false)?));
    }
    Ok(json_response(
        200,
        &store.update(rt, ns, name, patched, status)?,
    ))
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    Bytes::from(format!("{}\n", json!({"type": kind, "object": object})))
}

fn bookmark_line(rt: &ResourceType, rv: u64, initial_events_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": meta}),
    )
}

/// Maps a change onto what a watch with `filter` sees: objects moving into
/// or out of the selection appear as ADDED or DELETED, as on the real server.
fn change_line(rt: &ResourceType, filter: &Filter, change: &Change) -> Option<Bytes> {
    if change.resource != rt.plural {
        return None;
    }
    let now = filter.matches(&change.object);
    let before = change.old.as_ref().is_some_and(|o| filter.matches(o));
    let kind = match (change.kind, before, now) {
        (EventKind::Added, _, true) => "ADDED",
        (EventKind::Deleted, _, true) => "DELETED",
        (EventKind::Modified, true, true) => "MODIFIED",
        (EventKind::Modified, false, true) => "ADDED",
        (EventKind::Modified, true, false) => "DELETED",
        _ => return None,
    };
    Some(event_line(kind, &change.object))
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn start_watch<'q>(
    shared: &Arc<Shared>,
    rt: &'static ResourceType,
    filter: Filter,
    q: &impl Fn(&str) -> Option<&'q str>,
) -> Result<Response<Body>, ApiError> {
    let rv_param = q("resourceVersion").unwrap_or("");
    let send_initial = is_true(q("sendInitialEvents"));
    let bookmarks = is_true(q("allowWatchBookmarks"));
    let timeout = q("timeoutSeconds")
        .map(|t| {
            t.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {t:?}")))
        })
        .transpose()?;
    let mut lines = Vec::new();
    // Subscribing under the store lock means no change can fall between the
    // replayed/synthetic events and the live ones.
    let (mut rx, mut last_rv) = {
        let store = shared.store();
        if send_initial || rv_param.is_empty() || rv_param == "0" {
            lines.extend(
                store
                    .iter(rt)
                    .filter(|o| filter.matches(o))
                    .map(|o| event_line("ADDED", o)),
            );
            if send_initial && bookmarks {
                lines.push(bookmark_line(rt, store.rv, true));
            }
        } else {
            let from: u64 = rv_param.parse().map_err(|_| {
                ApiError::bad_request(format!("invalid resourceVersion {rv_param:?}"))
            })?;
            if from < store.compacted {
                // The real server answers 200 and then a single ERROR event.
                let err = ApiError::new(
                    410,
                    "Expired",
                    format!("too old resource version: {from} ({})", store.compacted + 1),
                );
                let body = event_line("ERROR", &err.to_status());
                let mut resp = json_response(200, &Value::Null);
                *resp.body_mut() = Full::new(body).boxed();
                return Ok(resp);
            }
            lines.extend(
                store
                    .history
                    .iter()
                    .filter(|c| c.rv > from)
                    .filter_map(|c| change_line(rt, &filter, c)),
            );
        }
        (store.events.subscribe(), store.rv)
    };
    let (tx, body_rx) = mpsc::channel::<Bytes>(256);
    let mut disrupt = shared.disrupt.subscribe();
    let every = Duration::from_millis(shared.bookmark_ms.load(Ordering::SeqCst).max(10));
    tokio::spawn(async move {
        let deadline = timeout.map(|s| Instant::now() + Duration::from_secs(s));
        let mut ticker = tokio::time::interval_at(Instant::now() + every, every);
        loop {
            let line = tokio::select! {
                _ = until(deadline) => break,
                _ = disrupt.changed() => break,
                _ = tx.closed() => break,
                _ = ticker.tick(), if bookmarks => bookmark_line(rt, last_rv, false),
                msg = rx.recv() => match msg {
                    Ok(change) => {
                        // Bookmarks may only claim versions this stream has passed.
                        last_rv = change.rv;
                        match change_line(rt, &filter, &change) {
                            Some(line) => line,
                            None => continue,
                        }
                    }
                    // Lagging behind: end the stream; the client resumes from
                    // its last resourceVersion, which the history still covers.
                    Err(_) => break,
                },
            };
            if tx.send(line).await.is_err() {
                break;
            }
        }
    });
    let live =
        futures::stream::unfold(
            body_rx,
            |mut rx| async move { rx.recv().await.map(|b| (b, rx)) },
        );
    let stream = futures::stream::iter(lines)
        .chain(live)
        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut resp = json_response(200, &Value::Null);
    *resp.body_mut() = BodyExt::boxed(StreamBody::new(stream));
    Ok(resp)
}
