//! Watch semantics, checked with kube's `runtime::watcher` and raw watches.
//! Every wait is bounded so a broken server fails the test instead of hanging it.

mod common;

use common::{api_status, setup, slice};
use futures::{Stream, StreamExt};
use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// The next successful watcher event, skipping transient errors (which the
/// outage test provokes on purpose).
async fn next_event<S>(stream: &mut S) -> watcher::Event<ResourceSlice>
where
    S: Stream<Item = Result<watcher::Event<ResourceSlice>, watcher::Error>> + Unpin,
{
    tokio::time::timeout(WAIT, async {
        loop {
            match stream.next().await.expect("watcher stream stays open") {
                Ok(event) => return event,
                Err(e) => eprintln!("watcher error (retried): {e}"),
            }
        }
    })
    .await
    .expect("watcher event within the timeout")
}

fn name(s: &ResourceSlice) -> &str {
    s.metadata.name.as_deref().unwrap_or_default()
}

/// Asserts the next event is the given variant for the named object.
async fn expect_event<S>(stream: &mut S, kind: &str, want: &str)
where
    S: Stream<Item = Result<watcher::Event<ResourceSlice>, watcher::Error>> + Unpin,
{
    let event = next_event(stream).await;
    let got = match &event {
        watcher::Event::Apply(s) => ("Apply", name(s)),
        watcher::Event::Delete(s) => ("Delete", name(s)),
        watcher::Event::InitApply(s) => ("InitApply", name(s)),
        watcher::Event::Init => ("Init", ""),
        watcher::Event::InitDone => ("InitDone", ""),
    };
    assert_eq!(got, (kind, want), "unexpected watcher event");
}

#[tokio::test]
async fn watcher_sees_create_modify_delete_with_field_selector() {
    let (server, client) = setup().await;
    let slices: Api<ResourceSlice> = Api::all(client);
    let pp = PostParams::default();
    slices
        .create(&pp, &slice(Some("a-old"), "node-a", "x.io"))
        .await
        .expect("create");
    slices
        .create(&pp, &slice(Some("b-old"), "node-b", "x.io"))
        .await
        .expect("create");

    let config = watcher::Config::default().fields("spec.nodeName=node-a,spec.driver=x.io");
    let mut events = Box::pin(watcher(slices.clone(), config));
    expect_event(&mut events, "Init", "").await;
    expect_event(&mut events, "InitApply", "a-old").await;
    expect_event(&mut events, "InitDone", "").await;

    slices
        .create(&pp, &slice(Some("b-new"), "node-b", "x.io"))
        .await
        .expect("create");
    slices
        .create(&pp, &slice(Some("a-new"), "node-a", "x.io"))
        .await
        .expect("create");
    expect_event(&mut events, "Apply", "a-new").await;

    let mut changed = slices.get("a-new").await.expect("get");
    changed.spec.pool.generation = 7;
    slices
        .replace("a-new", &pp, &changed)
        .await
        .expect("replace");
    match next_event(&mut events).await {
        watcher::Event::Apply(s) => assert_eq!(s.spec.pool.generation, 7),
        other => panic!("expected the modification, got {other:?}"),
    }
    slices
        .delete("b-old", &DeleteParams::default())
        .await
        .expect("delete");
    slices
        .delete("a-old", &DeleteParams::default())
        .await
        .expect("delete");
    expect_event(&mut events, "Delete", "a-old").await;

    // The watcher listed, then watched from the list's resourceVersion with bookmarks.
    let log = server.requests();
    let list = log
        .iter()
        .find(|r| {
            r.method == "GET"
                && r.path == "/apis/resource.k8s.io/v1/resourceslices"
                && !r.is_watch()
        })
        .expect("initial LIST");
    assert_eq!(
        list.query_param("fieldSelector").as_deref(),
        Some("spec.nodeName=node-a,spec.driver=x.io")
    );
    let watch = log.iter().find(|r| r.is_watch()).expect("WATCH request");
    assert_eq!(
        watch.query_param("allowWatchBookmarks").as_deref(),
        Some("true")
    );
    assert_eq!(
        watch.query_param("resourceVersion").as_deref(),
        Some("2"),
        "rv of the initial list"
    );
}

#[tokio::test]
async fn label_selector_transitions_become_added_and_deleted() {
    let (_server, client) = setup().await;
    let slices: Api<ResourceSlice> = Api::all(client);
    let mut events = Box::pin(watcher(
        slices.clone(),
        watcher::Config::default().labels("tier=gpu"),
    ));
    expect_event(&mut events, "Init", "").await;
    expect_event(&mut events, "InitDone", "").await;
    let pp = PatchParams::default();
    let label = |v: &str| Patch::Merge(json!({"metadata": {"labels": {"tier": v}}}));
    slices
        .create(&PostParams::default(), &slice(Some("s"), "n", "d"))
        .await
        .expect("create");
    slices.patch("s", &pp, &label("gpu")).await.expect("patch");
    expect_event(&mut events, "Apply", "s").await;
    // Leaving the selection is delivered as a deletion.
    slices.patch("s", &pp, &label("cpu")).await.expect("patch");
    expect_event(&mut events, "Delete", "s").await;
    slices.patch("s", &pp, &label("gpu")).await.expect("patch");
    expect_event(&mut events, "Apply", "s").await;
}

#[tokio::test]
async fn raw_watch_replays_sends_bookmarks_and_times_out() {
    let (server, client) = setup().await;
    server.set_bookmark_interval(Duration::from_millis(50));
    let slices: Api<ResourceSlice> = Api::all(client);
    let pp = PostParams::default();
    let first = slices
        .create(&pp, &slice(Some("s1"), "n", "d"))
        .await
        .expect("create");
    let from = first.metadata.resource_version.clone().expect("rv");
    let mut s1 = first.clone();
    s1.spec.pool.generation = 2;
    slices.replace("s1", &pp, &s1).await.expect("replace");
    slices
        .create(&pp, &slice(Some("s2"), "n", "d"))
        .await
        .expect("create");

    let wp = WatchParams::default().timeout(2);
    let mut stream = Box::pin(slices.watch(&wp, &from).await.expect("watch"));
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    // Replay after `from`, then a bookmark, then the server ends the stream.
    while let Some(event) = tokio::time::timeout_at(deadline, stream.next())
        .await
        .expect("stream ends in time")
    {
        match event.expect("event decodes") {
            WatchEvent::Added(s) => seen.push(format!("ADDED {}", name(&s))),
            WatchEvent::Modified(s) => seen.push(format!("MODIFIED {}", name(&s))),
            WatchEvent::Deleted(s) => seen.push(format!("DELETED {}", name(&s))),
            WatchEvent::Bookmark(b) => {
                assert_eq!(
                    b.metadata.resource_version,
                    server.resource_version().to_string()
                );
                if seen.last().is_none_or(|l| l != "BOOKMARK") {
                    seen.push("BOOKMARK".into());
                }
            }
            WatchEvent::Error(e) => panic!("unexpected error event {e:?}"),
        }
    }
    assert_eq!(seen, ["MODIFIED s1", "ADDED s2", "BOOKMARK"]);

    // resourceVersion "0" starts with synthetic ADDED events for what exists.
    let mut stream = Box::pin(
        slices
            .watch(&WatchParams::default().timeout(1), "0")
            .await
            .expect("watch"),
    );
    let mut added = Vec::new();
    while let Some(event) = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("in time")
    {
        if let WatchEvent::Added(s) = event.expect("decodes") {
            added.push(name(&s).to_owned());
        }
    }
    assert_eq!(added, ["s1", "s2"]);
}

#[tokio::test]
async fn streaming_list_ends_initial_events_with_a_bookmark() {
    let (_server, client) = setup().await;
    let slices: Api<ResourceSlice> = Api::all(client);
    slices
        .create(&PostParams::default(), &slice(Some("s1"), "n", "d"))
        .await
        .expect("create");
    let config = watcher::Config::default().streaming_lists();
    let mut events = Box::pin(watcher(slices.clone(), config));
    expect_event(&mut events, "Init", "").await;
    expect_event(&mut events, "InitApply", "s1").await;
    expect_event(&mut events, "InitDone", "").await;
    slices
        .create(&PostParams::default(), &slice(Some("s2"), "n", "d"))
        .await
        .expect("create");
    expect_event(&mut events, "Apply", "s2").await;
}

#[tokio::test]
async fn expired_resource_version_forces_a_relist() {
    let (server, client) = setup().await;
    let slices: Api<ResourceSlice> = Api::all(client);
    let created = slices
        .create(&PostParams::default(), &slice(Some("s1"), "n", "d"))
        .await
        .expect("create");
    slices
        .create(&PostParams::default(), &slice(Some("s2"), "n", "d"))
        .await
        .expect("create");
    server.compact();
    let old = created.metadata.resource_version.expect("rv");
    let mut stream = Box::pin(
        slices
            .watch(&WatchParams::default(), &old)
            .await
            .expect("watch"),
    );
    match tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("in time")
        .expect("an event")
    {
        Ok(WatchEvent::Error(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 410),
        other => panic!("expected 410 Gone, got {other:?}"),
    }

    // A watcher whose resourceVersion expired while it was cut off re-lists.
    let mut events =
        Box::pin(watcher(slices.clone(), watcher::Config::default()).default_backoff());
    expect_event(&mut events, "Init", "").await;
    expect_event(&mut events, "InitApply", "s1").await;
    expect_event(&mut events, "InitApply", "s2").await;
    expect_event(&mut events, "InitDone", "").await;
    server.set_refuse_connections(true);
    server
        .insert(serde_json::to_value(slice(Some("s3"), "n", "d")).expect("json"))
        .expect("insert");
    server.compact();
    server.set_refuse_connections(false);
    expect_event(&mut events, "Init", "").await;
    for want in ["s1", "s2", "s3"] {
        expect_event(&mut events, "InitApply", want).await;
    }
    expect_event(&mut events, "InitDone", "").await;
    let log = server.requests();
    let resumes = log
        .iter()
        .filter(|r| r.is_watch() && r.query_param("resourceVersion").as_deref() == Some("2"))
        .count();
    assert!(
        resumes >= 1,
        "the watcher tried to resume from its old resourceVersion"
    );
    // Other watch errors make the watcher retry the watch; only 410 re-lists.
    let lists = log
        .iter()
        .filter(|r| r.method == "GET" && !r.is_watch())
        .count();
    assert_eq!(lists, 2, "one initial list and one re-list after 410");
}

#[tokio::test]
async fn bad_watch_parameters_are_rejected() {
    let (_server, client) = setup().await;
    let slices: Api<ResourceSlice> = Api::all(client);
    let wp = WatchParams::default().fields("spec.unknown=1");
    let status = api_status(slices.watch(&wp, "0").await.err().expect("400"));
    assert_eq!(status.code, 400);
    let status = api_status(
        slices
            .watch(&WatchParams::default(), "abc")
            .await
            .err()
            .expect("400"),
    );
    assert_eq!(status.code, 400);
}
