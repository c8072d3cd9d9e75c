//! The object store: resource table, API errors, and the create / update /
//! delete rules (resourceVersion, generation, uid, finalizers, status
//! subresource) that every write path shares, plus the event history that
//! watches replay from.

use crate::util::{Rng, get_path, meta_str, now_rfc3339, set_meta};
use crate::validation::{generated_name, is_dns1123_subdomain, is_valid_generate_name};
use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use tokio::sync::broadcast;

/// Events kept for watches resuming from an older resourceVersion; older
/// ones are compacted away and such watches get 410 Gone.
const HISTORY_CAP: usize = 10_000;

/// A served resource type.
#[derive(Debug)]
pub(crate) struct ResourceType {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Has a `/status` subresource, so main-resource writes keep the old status.
    pub status: bool,
    /// Status is cleared on API create (real ResourceClaim strategy).
    pub reset_status_on_create: bool,
    /// Field labels accepted in `fieldSelector`.
    pub fields: &'static [&'static str],
    /// Paths that updates may not change (422 Invalid).
    pub immutable: &'static [&'static str],
}

impl ResourceType {
    pub(crate) fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `resourceslices.resource.k8s.io` as used in API error messages.
    pub(crate) fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

const META_FIELDS: &[&str] = &["metadata.name", "metadata.namespace"];

/// Every resource the fake serves.
pub(crate) static RESOURCES: &[ResourceType] = &[
    ResourceType {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        status: true,
        reset_status_on_create: false,
        fields: &["metadata.name", "metadata.namespace", "spec.unschedulable"],
        immutable: &[],
    },
    ResourceType {
        group: "resource.k8s.io",
        version: "v1",
        plural: "resourceslices",
        singular: "resourceslice",
        kind: "ResourceSlice",
        namespaced: false,
        status: false,
        reset_status_on_create: false,
        fields: &[
            "metadata.name",
            "metadata.namespace",
            "spec.nodeName",
            "spec.driver",
            "spec.pool.name",
        ],
        immutable: &["spec.driver", "spec.nodeName"],
    },
    ResourceType {
        group: "resource.k8s.io",
        version: "v1",
        plural: "deviceclasses",
        singular: "deviceclass",
        kind: "DeviceClass",
        namespaced: false,
        status: false,
        reset_status_on_create: false,
        fields: META_FIELDS,
        immutable: &[],
    },
    ResourceType {
        group: "resource.k8s.io",
        version: "v1",
        plural: "resourceclaims",
        singular: "resourceclaim",
        kind: "ResourceClaim",
        namespaced: true,
        status: true,
        reset_status_on_create: true,
        fields: META_FIELDS,
        immutable: &["spec"],
    },
    ResourceType {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        status: false,
        reset_status_on_create: false,
        fields: META_FIELDS,
        immutable: &[],
    },
];

/// Looks a resource up by group and plural name.
pub(crate) fn by_plural(group: &str, plural: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.plural == plural)
}

/// An error answered as a `metav1.Status`.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    details: Option<Value>,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn about(mut self, rt: &ResourceType, name: &str) -> Self {
        self.details = Some(json!({"name": name, "group": rt.group, "kind": rt.plural}));
        self
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub(crate) fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} {name:?} not found", rt.qualified()),
        )
        .about(rt, name)
    }

    pub(crate) fn conflict(rt: &ResourceType, name: &str, why: &str) -> Self {
        let msg = format!(
            "Operation cannot be fulfilled on {} {name:?}: {why}",
            rt.qualified()
        );
        Self::new(409, "Conflict", msg).about(rt, name)
    }

    pub(crate) fn invalid(rt: &ResourceType, name: &str, why: &str) -> Self {
        let msg = format!("{}.{} {name:?} is invalid: {why}", rt.kind, rt.group);
        Self::new(422, "Invalid", msg).about(rt, name)
    }

    /// The `Status` object body.
    pub(crate) fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message,
            "reason": self.reason, "code": self.code,
        });
        if let Some(d) = &self.details {
            status["details"] = d.clone();
        }
        status
    }
}

/// Kind of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventKind {
    Added,
    Modified,
    Deleted,
}

/// One committed change, broadcast to watches and kept in the history.
#[derive(Debug)]
pub(crate) struct Change {
    pub rv: u64,
    pub resource: &'static str,
    pub kind: EventKind,
    pub object: Value,
    /// The previous object, so watches with selectors can turn a MODIFIED
    /// that enters or leaves the selection into ADDED or DELETED.
    pub old: Option<Value>,
}

type Key = (&'static str, String, String);

/// The real server's message for an invalid DNS-1123 subdomain.
const DNS1123_SUBDOMAIN_MESSAGE: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

fn key(rt: &ResourceType, ns: &str, name: &str) -> Key {
    let ns = if rt.namespaced { ns } else { "" };
    (rt.plural, ns.to_owned(), name.to_owned())
}

/// All objects plus the global resourceVersion counter.
#[derive(Debug)]
pub(crate) struct Store {
    /// Last resourceVersion handed out; one counter across all types, like etcd.
    pub rv: u64,
    objects: BTreeMap<Key, Value>,
    pub history: VecDeque<Arc<Change>>,
    /// Highest resourceVersion no longer in `history`.
    pub compacted: u64,
    rng: Rng,
    pub events: broadcast::Sender<Arc<Change>>,
}

/// Checks `kind`/`apiVersion` (filling them when absent) and that metadata
/// is an object.
fn check_shape(rt: &ResourceType, obj: &mut Value) -> Result<(), ApiError> {
    let api_version = rt.api_version();
    let Some(map) = obj.as_object_mut() else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    match map.get("kind").and_then(Value::as_str) {
        Some(k) if k != rt.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                rt.kind
            )));
        }
        _ => {}
    }
    match map.get("apiVersion").and_then(Value::as_str) {
        Some(v) if v != api_version => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({api_version})"
            )));
        }
        _ => {}
    }
    map.insert("kind".into(), rt.kind.into());
    map.insert("apiVersion".into(), api_version.into());
    match map.entry("metadata").or_insert_with(|| json!({})) {
        Value::Object(_) => Ok(()),
        _ => Err(ApiError::bad_request("metadata must be an object")),
    }
}

fn copy_field(from: &Value, to: &mut Value, field: &str) {
    let value = from.get(field).cloned();
    if let Some(map) = to.as_object_mut() {
        match value {
            Some(v) => map.insert(field.to_owned(), v),
            None => map.remove(field),
        };
    }
}

fn copy_meta(from: &Value, to: &mut Value, field: &str) {
    let value = from.get("metadata").and_then(|m| m.get(field)).cloned();
    set_meta(to, field, value.unwrap_or(Value::Null));
}

impl Store {
    pub(crate) fn new() -> Self {
        Self {
            rv: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            compacted: 0,
            rng: Rng::new(),
            events: broadcast::channel(4096).0,
        }
    }

    pub(crate) fn get(&self, rt: &ResourceType, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&key(rt, ns, name))
    }

    /// Objects of one type in (namespace, name) order.
    pub(crate) fn iter<'a>(&'a self, rt: &'a ResourceType) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects
            .range((rt.plural, String::new(), String::new())..)
            .take_while(move |(k, _)| k.0 == rt.plural)
            .map(|(_, v)| v)
    }

    /// Bumps the global resourceVersion, applies the change and publishes it.
    fn commit(
        &mut self,
        rt: &'static ResourceType,
        kind: EventKind,
        mut obj: Value,
        old: Option<Value>,
    ) -> Value {
        self.rv += 1;
        set_meta(&mut obj, "resourceVersion", self.rv.to_string().into());
        let k = key(
            rt,
            meta_str(&obj, "namespace").unwrap_or(""),
            meta_str(&obj, "name").unwrap_or(""),
        );
        if kind == EventKind::Deleted {
            self.objects.remove(&k);
        } else {
            self.objects.insert(k, obj.clone());
        }
        let change = Arc::new(Change {
            rv: self.rv,
            resource: rt.plural,
            kind,
            object: obj.clone(),
            old,
        });
        self.history.push_back(change.clone());
        while self.history.len() > HISTORY_CAP {
            if let Some(c) = self.history.pop_front() {
                self.compacted = c.rv;
            }
        }
        // No subscribers is normal; the history still has the event.
        let _ = self.events.send(change);
        obj
    }

    /// Drops the whole event history so older resourceVersions expire.
    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    /// POST semantics. `keep_status` is for direct test inserts, which may
    /// seed status (e.g. an allocated claim) that API clients cannot.
    pub(crate) fn create(
        &mut self,
        rt: &'static ResourceType,
        ns: &str,
        mut obj: Value,
        keep_status: bool,
    ) -> Result<Value, ApiError> {
        check_shape(rt, &mut obj)?;
        if rt.namespaced {
            match meta_str(&obj, "namespace") {
                Some(body_ns) if !body_ns.is_empty() && body_ns != ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => set_meta(&mut obj, "namespace", ns.into()),
            }
        } else {
            set_meta(&mut obj, "namespace", Value::Null);
        }
        // Like ValidateObjectMetaAccessor: a generateName is checked as a prefix, and
        // the generated name is checked again as a name.
        if let Some(prefix) = meta_str(&obj, "generateName").filter(|p| !p.is_empty())
            && !is_valid_generate_name(prefix)
        {
            return Err(ApiError::invalid(
                rt,
                "",
                &format!(
                    "metadata.generateName: Invalid value: {prefix:?}: {DNS1123_SUBDOMAIN_MESSAGE}"
                ),
            ));
        }
        let name = match (meta_str(&obj, "name"), meta_str(&obj, "generateName")) {
            (Some(n), _) if !n.is_empty() => n.to_owned(),
            (_, Some(prefix)) if !prefix.is_empty() => {
                let prefix = prefix.to_owned();
                // A suffix collision is an AlreadyExists on the real server
                // too, but retrying keeps tests deterministic.
                let mut name = String::new();
                for _ in 0..8 {
                    name = generated_name(&prefix, &self.rng.name_suffix());
                    if self.get(rt, ns, &name).is_none() {
                        break;
                    }
                }
                name
            }
            _ => {
                return Err(ApiError::invalid(
                    rt,
                    "",
                    "metadata.name: Required value: name or generateName is required",
                ));
            }
        };
        if !is_dns1123_subdomain(&name) {
            return Err(ApiError::invalid(
                rt,
                &name,
                &format!("metadata.name: Invalid value: {name:?}: {DNS1123_SUBDOMAIN_MESSAGE}"),
            ));
        }
        if self.get(rt, ns, &name).is_some() {
            let msg = format!("{} {name:?} already exists", rt.qualified());
            return Err(ApiError::new(409, "AlreadyExists", msg).about(rt, &name));
        }
        set_meta(&mut obj, "name", name.into());
        let uid = self.rng.uuid();
        set_meta(&mut obj, "uid", uid.into());
        set_meta(&mut obj, "creationTimestamp", now_rfc3339().into());
        set_meta(&mut obj, "generation", 1.into());
        set_meta(&mut obj, "deletionTimestamp", Value::Null);
        if rt.reset_status_on_create
            && !keep_status
            && let Some(map) = obj.as_object_mut()
        {
            map.remove("status");
        }
        Ok(self.commit(rt, EventKind::Added, obj, None))
    }

    /// PUT semantics for the main resource or, with `status_only`, for the
    /// `/status` subresource. PATCH lands here after applying the patch.
    pub(crate) fn update(
        &mut self,
        rt: &'static ResourceType,
        ns: &str,
        name: &str,
        mut new: Value,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        let old = self
            .get(rt, ns, name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        check_shape(rt, &mut new)?;
        if let Some(body_name) = meta_str(&new, "name")
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let old_rv = meta_str(&old, "resourceVersion").unwrap_or("").to_owned();
        if let Some(rv) = meta_str(&new, "resourceVersion")
            && !rv.is_empty()
            && rv != old_rv
        {
            return Err(ApiError::conflict(
                rt,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        let mut next = if status_only {
            // Status writes may change nothing but status.
            let mut next = old.clone();
            copy_field(&new, &mut next, "status");
            next
        } else {
            for path in rt.immutable {
                if get_path(&old, path) != get_path(&new, path) {
                    return Err(ApiError::invalid(
                        rt,
                        name,
                        &format!("{path}: Invalid value: field is immutable"),
                    ));
                }
            }
            for field in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ] {
                copy_meta(&old, &mut new, field);
            }
            if rt.status {
                copy_field(&old, &mut new, "status");
            }
            if old.get("spec") != new.get("spec") {
                let generation = old
                    .get("metadata")
                    .and_then(|m| m.get("generation"))
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                set_meta(&mut new, "generation", (generation + 1).into());
            }
            new
        };
        set_meta(&mut next, "resourceVersion", old_rv.into());
        // No-op writes neither bump resourceVersion nor emit events, which is
        // what lets controllers detect update loops against the real server.
        if next == old {
            return Ok(old);
        }
        let deleting = meta_str(&next, "deletionTimestamp").is_some();
        let finalizers_left = next
            .get("metadata")
            .and_then(|m| m.get("finalizers"))
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        let kind = if deleting && !finalizers_left {
            EventKind::Deleted
        } else {
            EventKind::Modified
        };
        Ok(self.commit(rt, kind, next, Some(old)))
    }

    /// DELETE semantics. Returns the object and whether it is gone (false
    /// when finalizers only let it be marked with a deletionTimestamp).
    pub(crate) fn delete(
        &mut self,
        rt: &'static ResourceType,
        ns: &str,
        name: &str,
        uid: Option<&str>,
        rv: Option<&str>,
    ) -> Result<(Value, bool), ApiError> {
        let old = self
            .get(rt, ns, name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        for (label, want, field) in [
            ("UID", uid, "uid"),
            ("ResourceVersion", rv, "resourceVersion"),
        ] {
            let have = meta_str(&old, field).unwrap_or("");
            if let Some(want) = want
                && want != have
            {
                return Err(ApiError::conflict(
                    rt,
                    name,
                    &format!(
                        "Precondition failed: {label} in precondition: {want}, {label} in object meta: {have}"
                    ),
                ));
            }
        }
        let has_finalizers = old
            .get("metadata")
            .and_then(|m| m.get("finalizers"))
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if meta_str(&old, "deletionTimestamp").is_some() {
                return Ok((old, false));
            }
            let mut next = old.clone();
            set_meta(&mut next, "deletionTimestamp", now_rfc3339().into());
            set_meta(&mut next, "deletionGracePeriodSeconds", 0.into());
            return Ok((self.commit(rt, EventKind::Modified, next, Some(old)), false));
        }
        Ok((
            self.commit(rt, EventKind::Deleted, old.clone(), Some(old)),
            true,
        ))
    }

    /// Create-or-replace for direct test access: no preconditions, status kept.
    pub(crate) fn upsert(
        &mut self,
        rt: &'static ResourceType,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        check_shape(rt, &mut obj)?;
        let ns = meta_str(&obj, "namespace").unwrap_or("default").to_owned();
        let name = meta_str(&obj, "name").unwrap_or("").to_owned();
        if name.is_empty() || self.get(rt, &ns, &name).is_none() {
            return self.create(rt, &ns, obj, true);
        }
        set_meta(&mut obj, "resourceVersion", Value::Null);
        let status = obj.get("status").cloned();
        let updated = self.update(rt, &ns, &name, obj, false)?;
        match status {
            Some(s) if rt.status => {
                let mut with_status = updated;
                if let Some(map) = with_status.as_object_mut() {
                    map.insert("status".into(), s);
                }
                self.update(rt, &ns, &name, with_status, true)
            }
            _ => Ok(updated),
        }
    }
}
