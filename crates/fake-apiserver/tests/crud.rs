//! CRUD, selectors, preconditions, patches and error answers, driven through
//! the real kube client.

mod common;

use common::{api_status, claim, client_for, setup, slice};
use fake_apiserver::FakeApiServer;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::{DeviceClass, ResourceClaim, ResourceSlice};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn create_with_generate_name_then_get() {
    let (server, client) = setup().await;
    let slices: Api<ResourceSlice> = Api::all(client);
    let created = slices
        .create(
            &PostParams::default(),
            &slice(None, "node-1", "gpu.example.com"),
        )
        .await
        .expect("create");
    let name = created.metadata.name.clone().expect("name assigned");
    let suffix = name
        .strip_prefix("node-1-gpu.example.com-")
        .expect("prefix kept");
    assert_eq!(suffix.len(), 5, "{name}");
    assert!(
        suffix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    );
    assert_eq!(created.metadata.uid.as_ref().map(String::len), Some(36));
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.creation_timestamp.is_some());
    let rv: u64 = created
        .metadata
        .resource_version
        .clone()
        .expect("rv")
        .parse()
        .expect("numeric rv");
    assert_eq!(rv, server.resource_version());

    let fetched = slices.get(&name).await.expect("get");
    assert_eq!(fetched, created);
    assert_eq!(
        server.get("resourceslices", None, &name).expect("in store")["spec"]["driver"],
        "gpu.example.com"
    );

    // The global counter is shared across types.
    let node: Node = serde_json::from_value(json!({"metadata": {"name": "node-1"}})).expect("node");
    let node = Api::<Node>::all(slices.into_client())
        .create(&PostParams::default(), &node)
        .await
        .expect("node");
    assert_eq!(node.metadata.resource_version, Some((rv + 1).to_string()));
}

#[tokio::test]
async fn create_errors() {
    let (_server, client) = setup().await;
    let slices: Api<ResourceSlice> = Api::all(client.clone());
    slices
        .create(&PostParams::default(), &slice(Some("s1"), "n", "d"))
        .await
        .expect("create");
    let dup = slices
        .create(&PostParams::default(), &slice(Some("s1"), "n", "d"))
        .await;
    let status = api_status(dup.expect_err("duplicate"));
    assert_eq!(
        (status.code, status.reason.as_str()),
        (409, "AlreadyExists")
    );

    let mut nameless = slice(None, "n", "d");
    nameless.metadata.generate_name = None;
    let status = api_status(
        slices
            .create(&PostParams::default(), &nameless)
            .await
            .expect_err("no name"),
    );
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));

    let status = api_status(
        slices
            .create(&PostParams::default(), &slice(Some("Bad_Name"), "n", "d"))
            .await
            .expect_err("bad name"),
    );
    assert_eq!(status.code, 422);

    // Malformed JSON and oversized bodies are answered, not crashed on.
    let post = |body: Vec<u8>| {
        http::Request::post("/apis/resource.k8s.io/v1/resourceslices")
            .header("content-type", "application/json")
            .body(body)
            .expect("request")
    };
    let status = api_status(
        client
            .request_text(post(b"{not json".to_vec()))
            .await
            .expect_err("bad json"),
    );
    assert_eq!((status.code, status.reason.as_str()), (400, "BadRequest"));
    let status = api_status(
        client
            .request_text(post(b"[1,2]".to_vec()))
            .await
            .expect_err("not an object"),
    );
    assert_eq!(status.code, 400);
    let huge = format!("{{\"pad\":\"{}\"}}", "x".repeat(4 * 1024 * 1024));
    let status = api_status(
        client
            .request_text(post(huge.into_bytes()))
            .await
            .expect_err("too big"),
    );
    assert_eq!(status.code, 413);
    let wrong_kind = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "x"}});
    let status = api_status(
        client
            .request_text(post(wrong_kind.to_string().into_bytes()))
            .await
            .expect_err("kind"),
    );
    assert_eq!(status.code, 400);
}

#[tokio::test]
async fn get_missing_is_404_status() {
    let (_server, client) = setup().await;
    let status = api_status(
        Api::<Node>::all(client.clone())
            .get("nope")
            .await
            .expect_err("missing"),
    );
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
    assert_eq!(status.message, "nodes \"nope\" not found");
    let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), "default");
    let status = api_status(claims.get("nope").await.expect_err("missing"));
    assert_eq!(
        status.message,
        "resourceclaims.resource.k8s.io \"nope\" not found"
    );
    assert_eq!(
        Api::<ResourceClaim>::namespaced(client, "default")
            .get_opt("nope")
            .await
            .expect("get_opt"),
        None
    );
}

#[tokio::test]
async fn list_with_field_and_label_selectors() {
    let (server, client) = setup().await;
    let slices: Api<ResourceSlice> = Api::all(client);
    for (name, node, driver) in [
        ("a-x", "node-a", "x.io"),
        ("a-y", "node-a", "y.io"),
        ("b-x", "node-b", "x.io"),
    ] {
        slices
            .create(&PostParams::default(), &slice(Some(name), node, driver))
            .await
            .expect("create");
    }
    let names = |list: kube::core::ObjectList<ResourceSlice>| -> Vec<String> {
        list.items
            .into_iter()
            .filter_map(|s| s.metadata.name)
            .collect()
    };
    let lp = |f: &str| ListParams::default().fields(f);
    assert_eq!(
        names(
            slices
                .list(&lp("spec.nodeName=node-a,spec.driver=x.io"))
                .await
                .expect("list")
        ),
        ["a-x"]
    );
    assert_eq!(
        names(slices.list(&lp("spec.driver!=x.io")).await.expect("list")),
        ["a-y"]
    );
    assert_eq!(
        names(
            slices
                .list(&lp("spec.pool.name==node-b"))
                .await
                .expect("list")
        ),
        ["b-x"]
    );
    assert_eq!(
        names(slices.list(&lp("metadata.name=a-y")).await.expect("list")),
        ["a-y"]
    );
    assert_eq!(
        names(
            slices
                .list(&ListParams::default().labels("node=node-a"))
                .await
                .expect("list")
        ),
        ["a-x", "a-y"]
    );
    assert_eq!(
        names(
            slices
                .list(&ListParams::default().labels("node!=node-a"))
                .await
                .expect("list")
        ),
        ["b-x"]
    );
    assert_eq!(
        names(
            slices
                .list(&ListParams::default().labels("missing"))
                .await
                .expect("list")
        )
        .len(),
        0
    );

    let all = slices.list(&ListParams::default()).await.expect("list");
    assert_eq!(
        all.metadata.resource_version,
        Some(server.resource_version().to_string())
    );
    assert_eq!(all.items.len(), 3);

    let status = api_status(
        slices
            .list(&lp("spec.bogus=1"))
            .await
            .expect_err("unknown field"),
    );
    assert_eq!((status.code, status.reason.as_str()), (400, "BadRequest"));
    assert!(status.message.contains("spec.bogus"), "{}", status.message);

    // Pagination hands out continue tokens until the list is exhausted.
    let page1 = slices
        .list(&ListParams::default().limit(2))
        .await
        .expect("page 1");
    assert_eq!(names(page1.clone()), ["a-x", "a-y"]);
    let token = page1.metadata.continue_.expect("continue token");
    let page2 = slices
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .expect("page 2");
    assert_eq!(names(page2.clone()), ["b-x"]);
    assert!(page2.metadata.continue_.is_none_or(|c| c.is_empty()));
}

#[tokio::test]
async fn namespaced_claims_are_scoped() {
    let (server, client) = setup().await;
    for ns in ["ns1", "ns2"] {
        Api::<ResourceClaim>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &claim("c"))
            .await
            .expect("create");
    }
    let ns1: Api<ResourceClaim> = Api::namespaced(client.clone(), "ns1");
    assert_eq!(
        ns1.list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        1
    );
    let all: Api<ResourceClaim> = Api::all(client);
    assert_eq!(
        all.list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        2
    );
    let by_ns = all
        .list(&ListParams::default().fields("metadata.namespace=ns2"))
        .await
        .expect("list");
    assert_eq!(by_ns.items[0].metadata.namespace.as_deref(), Some("ns2"));
    assert_eq!(server.list("resourceclaims", Some("ns1")).len(), 1);
    assert!(server.get("resourceclaims", Some("ns3"), "c").is_none());
}

#[tokio::test]
async fn replace_checks_resource_version_and_bumps_generation() {
    let (_server, client) = setup().await;
    let slices: Api<ResourceSlice> = Api::all(client);
    let v1 = slices
        .create(&PostParams::default(), &slice(Some("s"), "n", "d"))
        .await
        .expect("create");

    let mut labels_only = v1.clone();
    labels_only
        .metadata
        .labels
        .get_or_insert_default()
        .insert("k".into(), "v".into());
    let v2 = slices
        .replace("s", &PostParams::default(), &labels_only)
        .await
        .expect("replace");
    assert_ne!(v2.metadata.resource_version, v1.metadata.resource_version);
    assert_eq!(
        v2.metadata.generation,
        Some(1),
        "metadata-only change keeps generation"
    );

    let mut spec_change = v2.clone();
    spec_change.spec.pool.generation = 2;
    let v3 = slices
        .replace("s", &PostParams::default(), &spec_change)
        .await
        .expect("replace");
    assert_eq!(v3.metadata.generation, Some(2));
    assert_eq!(v3.metadata.uid, v1.metadata.uid);

    // Replaying an unchanged object is a no-op: same resourceVersion.
    let v4 = slices
        .replace("s", &PostParams::default(), &v3)
        .await
        .expect("no-op replace");
    assert_eq!(v4.metadata.resource_version, v3.metadata.resource_version);

    let status = api_status(
        slices
            .replace("s", &PostParams::default(), &v1)
            .await
            .expect_err("stale"),
    );
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));

    let mut immutable = v3.clone();
    immutable.spec.driver = "other".into();
    let status = api_status(
        slices
            .replace("s", &PostParams::default(), &immutable)
            .await
            .expect_err("immutable"),
    );
    assert_eq!(status.code, 422);

    let mut missing = v3.clone();
    missing.metadata.name = Some("gone".into());
    let status = api_status(
        slices
            .replace("gone", &PostParams::default(), &missing)
            .await
            .expect_err("404"),
    );
    assert_eq!(status.code, 404);
}

#[tokio::test]
async fn delete_with_preconditions() {
    let (server, client) = setup().await;
    let slices: Api<ResourceSlice> = Api::all(client);
    let s = slices
        .create(&PostParams::default(), &slice(Some("s"), "n", "d"))
        .await
        .expect("create");
    let with = |uid: Option<&str>, rv: Option<&str>| DeleteParams {
        preconditions: Some(Preconditions {
            uid: uid.map(Into::into),
            resource_version: rv.map(Into::into),
        }),
        ..DeleteParams::default()
    };
    let status = api_status(
        slices
            .delete("s", &with(Some("wrong"), None))
            .await
            .expect_err("uid"),
    );
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    let status = api_status(
        slices
            .delete("s", &with(None, Some("999")))
            .await
            .expect_err("rv"),
    );
    assert!(
        status.message.contains("Precondition failed"),
        "{}",
        status.message
    );
    assert!(server.get("resourceslices", None, "s").is_some());

    let done = slices
        .delete(
            "s",
            &with(
                s.metadata.uid.as_deref(),
                s.metadata.resource_version.as_deref(),
            ),
        )
        .await
        .expect("delete");
    let status = done.right().expect("a Status for a completed delete");
    assert_eq!(
        status.details.expect("details").uid,
        s.metadata.uid.unwrap_or_default()
    );
    assert!(server.get("resourceslices", None, "s").is_none());
    let status = api_status(
        slices
            .delete("s", &DeleteParams::default())
            .await
            .expect_err("gone"),
    );
    assert_eq!(status.code, 404);
}

#[tokio::test]
async fn delete_collection_by_field_selector() {
    let (server, client) = setup().await;
    let slices: Api<ResourceSlice> = Api::all(client);
    for (node, driver) in [
        ("node-a", "x.io"),
        ("node-a", "x.io"),
        ("node-a", "y.io"),
        ("node-b", "x.io"),
    ] {
        slices
            .create(&PostParams::default(), &slice(None, node, driver))
            .await
            .expect("create");
    }
    let deleted = slices
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().fields("spec.nodeName=node-a,spec.driver=x.io"),
        )
        .await
        .expect("delete collection")
        .left()
        .expect("a list of deleted objects");
    assert_eq!(deleted.items.len(), 2);
    let left: Vec<_> = server
        .list("resourceslices", None)
        .into_iter()
        .map(|s| (s["spec"]["nodeName"].clone(), s["spec"]["driver"].clone()))
        .collect();
    assert_eq!(
        left,
        [
            (json!("node-a"), json!("y.io")),
            (json!("node-b"), json!("x.io"))
        ]
    );
}

#[tokio::test]
#[allow(clippy::too_many_lines)] // one object through every patch kind in order
async fn patches_and_status_subresource() {
    let (server, client) = setup().await;
    let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), "default");
    let mut with_status = claim("c");
    with_status.status = serde_json::from_value(
        json!({"reservedFor": [{"resource": "pods", "name": "p", "uid": "u"}]}),
    )
    .expect("status");
    let created = claims
        .create(&PostParams::default(), &with_status)
        .await
        .expect("create");
    assert!(
        created.status.is_none(),
        "create drops status, as for real claims"
    );

    let pp = PatchParams::default();
    let labelled = claims
        .patch(
            "c",
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {"a": "1"}}})),
        )
        .await
        .expect("merge");
    assert_eq!(
        labelled
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("a"))
            .map(String::as_str),
        Some("1")
    );
    let strategic = claims
        .patch(
            "c",
            &pp,
            &Patch::Strategic(json!({"metadata": {"labels": {"b": "2"}}})),
        )
        .await
        .expect("strategic");
    assert_eq!(strategic.metadata.labels.map(|l| l.len()), Some(2));

    let allocation = json!({"status": {"allocation": {"devices": {"results": [
        {"request": "gpu", "driver": "gpu.example.com", "pool": "node-1", "device": "gpu-0"}]}}}});
    let allocated = claims
        .patch_status("c", &pp, &Patch::Merge(allocation.clone()))
        .await
        .expect("status patch");
    let results = allocated
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
        .and_then(|d| d.results.clone());
    assert_eq!(results.map(|r| r[0].device.clone()), Some("gpu-0".into()));
    assert_eq!(
        allocated.metadata.generation,
        Some(1),
        "status writes keep generation"
    );

    // Main-resource writes cannot change status, and the claim spec is immutable.
    let cleared = claims
        .patch("c", &pp, &Patch::Merge(json!({"status": null})))
        .await
        .expect("merge");
    assert!(cleared.status.is_some());
    let status = api_status(
        claims
            .patch(
                "c",
                &pp,
                &Patch::Merge(json!({"spec": {"devices": {"requests": []}}})),
            )
            .await
            .expect_err("immutable spec"),
    );
    assert_eq!(status.code, 422);
    // A status write cannot change labels.
    let ignored = claims
        .patch_status(
            "c",
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {"z": "9"}}})),
        )
        .await
        .expect("noop");
    assert!(
        !ignored
            .metadata
            .labels
            .unwrap_or_default()
            .contains_key("z")
    );

    // JSON patch, including a failing test op that must leave the object alone.
    let json_patch = |ops: serde_json::Value| {
        http::Request::patch("/apis/resource.k8s.io/v1/namespaces/default/resourceclaims/c")
            .header("content-type", "application/json-patch+json")
            .body(ops.to_string().into_bytes())
            .expect("request")
    };
    let patched: ResourceClaim = client
        .request(json_patch(json!([
            {"op": "add", "path": "/metadata/annotations", "value": {"x": "y"}},
            {"op": "test", "path": "/metadata/labels/a", "value": "1"}
        ])))
        .await
        .expect("json patch");
    assert_eq!(
        patched
            .metadata
            .annotations
            .and_then(|a| a.get("x").cloned()),
        Some("y".into())
    );
    let failing = json!([
        {"op": "remove", "path": "/metadata/annotations"},
        {"op": "test", "path": "/metadata/labels/a", "value": "other"}
    ]);
    let status = api_status(
        client
            .request_text(json_patch(failing))
            .await
            .expect_err("test op"),
    );
    assert_eq!(status.code, 422);
    assert!(
        server
            .get("resourceclaims", Some("default"), "c")
            .expect("claim")["metadata"]["annotations"]
            .is_object()
    );
    let unsupported =
        http::Request::patch("/apis/resource.k8s.io/v1/namespaces/default/resourceclaims/c")
            .header("content-type", "text/plain")
            .body(b"x".to_vec())
            .expect("request");
    assert_eq!(
        api_status(client.request_text(unsupported).await.expect_err("415")).code,
        415
    );

    // A patch carrying a stale resourceVersion is a precondition.
    let stale = json!({"metadata": {"resourceVersion": created.metadata.resource_version, "labels": {"c": "3"}}});
    let status = api_status(
        claims
            .patch("c", &pp, &Patch::Merge(stale))
            .await
            .expect_err("stale"),
    );
    assert_eq!(status.code, 409);
    let status = api_status(
        claims
            .patch("nope", &pp, &Patch::Merge(json!({})))
            .await
            .expect_err("missing"),
    );
    assert_eq!(status.code, 404);
}

#[tokio::test]
async fn apply_creates_then_merges() {
    let (_server, client) = setup().await;
    let classes: Api<DeviceClass> = Api::all(client);
    let pp = PatchParams::apply("test");
    let class = json!({"apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass", "metadata": {"name": "vfio"},
                       "spec": {"selectors": [{"cel": {"expression": "device.driver == \"x\""}}]}});
    let created = classes
        .patch("vfio", &pp, &Patch::Apply(&class))
        .await
        .expect("apply creates");
    assert_eq!(created.metadata.generation, Some(1));
    let labelled = json!({"apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass", "metadata": {"name": "vfio", "labels": {"a": "b"}}});
    let updated = classes
        .patch("vfio", &pp, &Patch::Apply(&labelled))
        .await
        .expect("apply merges");
    assert!(updated.spec.selectors.is_some());
    assert_eq!(updated.metadata.uid, created.metadata.uid);
}

#[tokio::test]
async fn finalizers_delay_deletion() {
    let (server, client) = setup().await;
    let claims: Api<ResourceClaim> = Api::namespaced(client, "default");
    let mut c = claim("c");
    c.metadata.finalizers = Some(vec!["resource.kubernetes.io/delete-protection".into()]);
    claims
        .create(&PostParams::default(), &c)
        .await
        .expect("create");
    let pending = claims
        .delete("c", &DeleteParams::default())
        .await
        .expect("delete")
        .left()
        .expect("object");
    assert!(pending.metadata.deletion_timestamp.is_some());
    assert!(server.get("resourceclaims", Some("default"), "c").is_some());
    claims
        .patch(
            "c",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .expect("drop finalizer");
    assert!(server.get("resourceclaims", Some("default"), "c").is_none());
}

#[tokio::test]
async fn insert_seeds_status_and_log_records_requests() {
    let (server, client) = setup().await;
    let stored = server
        .insert(
            json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                       "metadata": {"name": "c", "namespace": "ns"},
                       "spec": {}, "status": {"allocation": {"devices": {"results": []}}}}),
        )
        .expect("insert");
    assert!(stored["metadata"]["uid"].is_string());
    let claims: Api<ResourceClaim> = Api::namespaced(client, "ns");
    let fetched = claims.get("c").await.expect("get");
    assert!(
        fetched.status.and_then(|s| s.allocation).is_some(),
        "inserted status is served"
    );
    assert!(
        server
            .insert(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}))
            .is_err()
    );

    claims
        .list(&ListParams::default().fields("metadata.name=c"))
        .await
        .expect("list");
    let log = server.requests();
    let last = log.last().expect("requests logged");
    assert_eq!(
        (last.method.as_str(), last.path.as_str()),
        (
            "GET",
            "/apis/resource.k8s.io/v1/namespaces/ns/resourceclaims"
        )
    );
    assert_eq!(
        last.query_param("fieldSelector").as_deref(),
        Some("metadata.name=c")
    );
    assert!(!last.is_watch());
    server.clear_requests();
    assert!(server.requests().is_empty());
    assert_eq!(
        server
            .delete("resourceclaims", Some("ns"), "c")
            .map(|c| c["metadata"]["name"].clone()),
        Some(json!("c"))
    );
}

#[tokio::test]
async fn unavailable_and_refused_connections() {
    let (server, retrying) = setup().await;
    // kube retries 503 by default, so use a client without retries to see it.
    let nodes: Api<Node> = Api::all(client_for(&server, false));
    nodes.list(&ListParams::default()).await.expect("available");
    server.set_unavailable(true);
    let status = api_status(nodes.list(&ListParams::default()).await.expect_err("503"));
    assert_eq!(
        (status.code, status.reason.as_str()),
        (503, "ServiceUnavailable")
    );
    let before = server.requests().len();
    let retried = tokio::spawn(async move {
        Api::<Node>::all(retrying)
            .list(&ListParams::default())
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.set_unavailable(false);
    let after_retry = tokio::time::timeout(Duration::from_secs(30), retried)
        .await
        .expect("retry finishes");
    after_retry
        .expect("task")
        .expect("a retrying client rides out the outage");
    assert!(
        server.requests().len() > before + 1,
        "the default client retried"
    );
    nodes
        .list(&ListParams::default())
        .await
        .expect("available again");

    server.set_refuse_connections(true);
    let err = nodes
        .list(&ListParams::default())
        .await
        .expect_err("refused");
    assert!(
        !matches!(err, kube::Error::Api(_)),
        "transport error expected, got {err:?}"
    );
    server.set_refuse_connections(false);
    nodes
        .list(&ListParams::default())
        .await
        .expect("accepting again");
}

#[tokio::test]
async fn discovery_and_kubeconfig() {
    let (server, client) = setup().await;
    let version = client.apiserver_version().await.expect("version");
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "34")
    );
    let groups = client.list_api_groups().await.expect("groups");
    assert_eq!(groups.groups[0].name, "resource.k8s.io");
    let resources = client
        .list_api_group_resources("resource.k8s.io/v1")
        .await
        .expect("resources");
    let names: Vec<_> = resources
        .resources
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert!(
        names.contains(&"resourceclaims/status") && names.contains(&"resourceslices"),
        "{names:?}"
    );
    let core = client.list_core_api_resources("v1").await.expect("core");
    assert!(core.resources.iter().any(|r| r.name == "nodes"));

    let dir =
        std::env::temp_dir().join(format!("fake-apiserver-kubeconfig-{}", std::process::id()));
    server.write_kubeconfig(&dir).expect("write kubeconfig");
    let kubeconfig = kube::config::Kubeconfig::read_from(&dir).expect("parse kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("config");
    std::fs::remove_file(&dir).ok();
    assert_eq!(config.default_namespace, "default");
    common::install_crypto_provider();
    let client = kube::Client::try_from(config).expect("client");
    Api::<Node>::all(client)
        .list(&ListParams::default())
        .await
        .expect("list via kubeconfig");
}

#[tokio::test]
async fn shutdown_closes_the_port() {
    let server = FakeApiServer::start().await.expect("start");
    let addr = server.addr();
    assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
    server.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
