//! Tests of the metadata client against the fakes on 127.0.0.1. Nothing here talks to any other
//! address: every endpoint is asserted to be loopback, and test builds refuse anything else.

use std::time::Duration;

use hyper::Method;

use super::fake::{AwsIdentity, AzureIdentity, FakeAws, FakeAzure};
use super::*;

fn loopback(endpoint: &str) -> &str {
    assert!(endpoint.starts_with("http://127.0.0.1:"), "{endpoint} is not loopback");
    endpoint
}

async fn aws() -> (FakeAws, MetadataClient) {
    let fake = FakeAws::start().await.unwrap();
    let client = MetadataClient::new(CloudKind::Aws, Some(loopback(&fake.endpoint()))).unwrap();
    (fake, client)
}

async fn azure() -> (FakeAzure, MetadataClient) {
    let fake = FakeAzure::start().await.unwrap();
    let client = MetadataClient::new(CloudKind::Azure, Some(loopback(&fake.endpoint()))).unwrap();
    (fake, client)
}

/// A raw request to a fake, bypassing the client's token and header handling.
async fn raw(endpoint: &str, method: Method, path: &str, headers: &[(&str, &str)]) -> http::Reply {
    let target = http::Target::parse(loopback(endpoint)).unwrap();
    http::request(&target, method, path, headers, None, REQUEST_TIMEOUT).await.unwrap()
}

fn field_of(err: &CloudError) -> &str {
    match err {
        CloudError::Malformed { field, .. } => field,
        other => panic!("expected a Malformed error, got {other:?}"),
    }
}

// ---- kinds and endpoints

#[test]
fn kind_parses_and_names_bad_values() {
    assert_eq!("none".parse::<CloudKind>().unwrap(), CloudKind::None);
    assert_eq!("aws".parse::<CloudKind>().unwrap(), CloudKind::Aws);
    assert_eq!("azure".parse::<CloudKind>().unwrap(), CloudKind::Azure);
    for k in [CloudKind::None, CloudKind::Aws, CloudKind::Azure] {
        assert_eq!(k.to_string().parse::<CloudKind>().unwrap(), k);
    }
    let err = "gcp".parse::<CloudKind>().unwrap_err();
    assert!(err.to_string().contains("'gcp'"), "{err}");
    assert!("AWS".parse::<CloudKind>().is_err());
}

#[test]
fn endpoints_are_parsed_strictly() {
    let c = MetadataClient::new(CloudKind::Aws, Some("http://127.0.0.1:8080/")).unwrap();
    assert_eq!(c.endpoint(), "http://127.0.0.1:8080");
    assert!(MetadataClient::new(CloudKind::Aws, Some("http://[::1]:9")).is_ok());
    for bad in [
        "https://127.0.0.1:1",
        "127.0.0.1:1",
        "http://",
        "http://127.0.0.1:1/latest",
        "http://user@127.0.0.1:1",
        "http://127.0.0.1:0",
        "http://127.0.0.1:70000",
        "http://127.0.0.1:x",
        "http://[::1",
        "http://127.0.0.1 :1",
    ] {
        let err = MetadataClient::new(CloudKind::Aws, Some(bad)).unwrap_err();
        assert!(matches!(err, CloudError::Endpoint { .. }), "{bad}: {err:?}");
    }
}

#[tokio::test]
async fn default_endpoint_is_imds_and_test_builds_never_reach_it() {
    let c = MetadataClient::new(CloudKind::Aws, None).unwrap();
    assert_eq!(c.endpoint(), DEFAULT_ENDPOINT);
    // Refused before any connection is attempted: test builds only talk to loopback.
    let err = c.discover().await.unwrap_err();
    assert!(matches!(&err, CloudError::Transport { message, .. } if message.contains("loopback")), "{err:?}");
    let c = MetadataClient::new(CloudKind::Azure, None).unwrap();
    let err = c.poll_notice().await.unwrap_err();
    assert!(matches!(&err, CloudError::Transport { message, .. } if message.contains("loopback")), "{err:?}");
}

#[tokio::test]
async fn cloud_none_has_nothing_to_ask() {
    let c = MetadataClient::new(CloudKind::None, Some("http://127.0.0.1:9")).unwrap();
    assert!(matches!(c.discover().await, Err(CloudError::NoCloud)));
    assert_eq!(c.poll_notice().await.unwrap(), None);
    c.acknowledge("x").await.unwrap();
}

// ---- AWS

#[tokio::test]
async fn aws_discover() {
    let (fake, client) = aws().await;
    let info = client.discover().await.unwrap();
    assert_eq!(
        info,
        CloudInfo {
            region: "us-east-1".into(),
            zone: "us-east-1a".into(),
            instance_type: "p5.48xlarge".into(),
            spot: true,
            instance_id: "i-0fa4e1c0ffee12345".into(),
        }
    );
    fake.set_identity(AwsIdentity {
        instance_type: "p4d.24xlarge".into(),
        region: "us-west-2".into(),
        zone: "us-west-2b".into(),
        instance_id: "i-0123456789abcdef0".into(),
        life_cycle: "on-demand".into(),
    });
    let info = client.discover().await.unwrap();
    assert_eq!((info.instance_type.as_str(), info.zone.as_str(), info.spot), ("p4d.24xlarge", "us-west-2b", false));
}

#[tokio::test]
async fn aws_fake_requires_a_token() {
    let fake = FakeAws::start().await.unwrap();
    let ep = fake.endpoint();
    // No token, or a made-up one: 401.
    assert_eq!(raw(&ep, Method::GET, AWS_INSTANCE_TYPE, &[]).await.status, 401);
    assert_eq!(raw(&ep, Method::GET, AWS_INSTANCE_TYPE, &[(AWS_TOKEN_HEADER, "forged")]).await.status, 401);
    // A token request without a lifetime, or with an out-of-range one: 400.
    assert_eq!(raw(&ep, Method::PUT, AWS_TOKEN_PATH, &[]).await.status, 400);
    assert_eq!(raw(&ep, Method::PUT, AWS_TOKEN_PATH, &[(AWS_TOKEN_TTL_HEADER, "21601")]).await.status, 400);
    let reply = raw(&ep, Method::PUT, AWS_TOKEN_PATH, &[(AWS_TOKEN_TTL_HEADER, "60")]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers.get(AWS_TOKEN_TTL_HEADER).unwrap(), "60");
    let token = std::str::from_utf8(&reply.body).unwrap().to_string();
    let reply = raw(&ep, Method::GET, AWS_INSTANCE_TYPE, &[(AWS_TOKEN_HEADER, &token)]).await;
    assert_eq!((reply.status, &reply.body[..]), (200, &b"p5.48xlarge"[..]));
    fake.expire_tokens();
    assert_eq!(raw(&ep, Method::GET, AWS_INSTANCE_TYPE, &[(AWS_TOKEN_HEADER, &token)]).await.status, 401);
    assert_eq!(fake.unauthorized_requests(), 3);
}

#[tokio::test]
async fn aws_token_is_reused_then_refetched_after_expiry() {
    let (fake, client) = aws().await;
    client.discover().await.unwrap();
    assert_eq!(fake.token_requests(), 1, "five concurrent reads share one token");
    client.discover().await.unwrap();
    assert_eq!(client.poll_notice().await.unwrap(), None);
    assert_eq!(fake.token_requests(), 1, "the token is cached");
    assert_eq!(fake.unauthorized_requests(), 0);
    fake.expire_tokens();
    client.discover().await.unwrap();
    assert_eq!(fake.token_requests(), 2, "a 401 fetches a new token");
    assert!(fake.unauthorized_requests() >= 1);
    fake.expire_tokens();
    assert_eq!(client.poll_notice().await.unwrap(), None);
    assert_eq!(fake.token_requests(), 3);
}

#[test]
fn aws_token_is_renewed_before_it_expires() {
    let t0 = std::time::Instant::now();
    let long = AwsToken::new("t".into(), AWS_TOKEN_TTL_SECS, t0);
    assert!(long.fresh(t0));
    assert!(long.fresh(t0 + Duration::from_secs(AWS_TOKEN_TTL_SECS - 61)));
    assert!(!long.fresh(t0 + Duration::from_secs(AWS_TOKEN_TTL_SECS - 60)));
    let short = AwsToken::new("t".into(), 10, t0);
    assert!(short.fresh(t0 + Duration::from_secs(4)));
    assert!(!short.fresh(t0 + Duration::from_secs(5)));
    assert!(!AwsToken::new("t".into(), 0, t0).fresh(t0));
}

#[tokio::test]
async fn aws_notices() {
    let (fake, client) = aws().await;
    assert_eq!(client.poll_notice().await.unwrap(), None);
    fake.post_instance_action("terminate", "2026-11-26T12:34:56Z");
    let n = client.poll_notice().await.unwrap().unwrap();
    assert_eq!(n.kind, NoticeKind::AwsInstanceAction);
    assert_eq!(n.deadline_unix_ms, 1_795_696_496_000);
    assert_eq!(n.detail, "terminate");
    assert_eq!(n.event_id, "aws:terminate:2026-11-26T12:34:56Z");
    assert_eq!(client.poll_notice().await.unwrap().unwrap(), n, "stable across polls");
    fake.post_instance_action("hibernate", "2024-02-29T23:59:59Z");
    let n = client.poll_notice().await.unwrap().unwrap();
    assert_eq!((n.detail.as_str(), n.deadline_unix_ms), ("hibernate", 1_709_251_199_000));
    fake.clear_instance_action();
    assert_eq!(client.poll_notice().await.unwrap(), None);
}

#[tokio::test]
async fn aws_bad_notices_name_the_field() {
    let (fake, client) = aws().await;
    fake.post_instance_action("stop", "2026-11-26 12:34:56");
    assert_eq!(field_of(&client.poll_notice().await.unwrap_err()), "time");
    fake.post_instance_action("stop", "2026-02-30T00:00:00Z");
    assert_eq!(field_of(&client.poll_notice().await.unwrap_err()), "time");
    fake.post_instance_action("", "2026-11-26T12:34:56Z");
    assert_eq!(field_of(&client.poll_notice().await.unwrap_err()), "action");
    let cases: [(&[u8], &str); 7] = [
        (b"{\"action\": \"stop\"", "body"),
        (b"[1, 2]", "body"),
        (b"{\"time\": \"2026-11-26T12:34:56Z\"}", "action"),
        (b"{\"action\": \"stop\"}", "time"),
        (b"{\"action\": \"stop\", \"time\": 1795696496}", "time"),
        (b"{\"action\": 7, \"time\": \"2026-11-26T12:34:56Z\"}", "action"),
        (b"\xff\xfe", "body"),
    ];
    for (body, field) in cases {
        fake.override_path(AWS_INSTANCE_ACTION, 200, body.to_vec());
        let err = client.poll_notice().await.unwrap_err();
        assert_eq!(field_of(&err), field, "{}", String::from_utf8_lossy(body));
        assert!(err.to_string().starts_with(AWS_INSTANCE_ACTION), "{err}");
    }
    fake.override_path(AWS_INSTANCE_ACTION, 500, "");
    assert!(matches!(client.poll_notice().await, Err(CloudError::Status { status: 500, .. })));
}

#[tokio::test]
async fn aws_bad_values_name_the_path() {
    let (fake, client) = aws().await;
    fake.override_path(AWS_ZONE, 200, "us east 1a");
    let err = client.discover().await.unwrap_err();
    assert_eq!(field_of(&err), "availability-zone");
    assert!(err.to_string().contains(AWS_ZONE), "{err}");
    fake.override_path(AWS_ZONE, 200, "");
    assert_eq!(field_of(&client.discover().await.unwrap_err()), "availability-zone");
    fake.override_path(AWS_ZONE, 200, "z".repeat(MAX_VALUE_BYTES + 1));
    assert_eq!(field_of(&client.discover().await.unwrap_err()), "availability-zone");
    fake.override_path(AWS_ZONE, 404, "");
    assert!(matches!(client.discover().await, Err(CloudError::Status { status: 404, .. })));
    fake.override_path(AWS_ZONE, 200, "us-east-1a\n");
    assert_eq!(client.discover().await.unwrap().zone, "us-east-1a", "surrounding whitespace is trimmed");
}

#[tokio::test]
async fn oversized_answers_are_refused() {
    let (fake, client) = aws().await;
    fake.override_path(AWS_INSTANCE_ID, 200, vec![b'i'; MAX_BODY_BYTES + 1]);
    let err = client.discover().await.unwrap_err();
    assert!(matches!(&err, CloudError::TooLarge { path, .. } if path == AWS_INSTANCE_ID), "{err:?}");
    // Exactly the limit is read, then refused as a value.
    fake.override_path(AWS_INSTANCE_ID, 200, vec![b'i'; MAX_BODY_BYTES]);
    assert_eq!(field_of(&client.discover().await.unwrap_err()), "instance-id");
}

/// A loopback server that answers every connection with `head` and then `body_len` bytes of
/// body without a Content-Length (read to EOF), or that never answers when `head` is empty.
async fn raw_server(head: &'static str, body_len: usize) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                if head.is_empty() {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    return;
                }
                let _ = conn.write_all(head.as_bytes()).await;
                let chunk = vec![b'x'; 64 * 1024];
                let mut left = body_len;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if conn.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n;
                }
            });
        }
    });
    (endpoint, task)
}

#[tokio::test]
async fn streamed_oversized_answers_and_silent_servers_are_errors() {
    let (ep, task) = raw_server("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", MAX_BODY_BYTES + 4096).await;
    let client = MetadataClient::new(CloudKind::Azure, Some(loopback(&ep))).unwrap();
    let err = client.discover().await.unwrap_err();
    assert!(matches!(err, CloudError::TooLarge { .. }), "{err:?}");
    task.abort();

    let (ep, task) = raw_server("", 0).await;
    let client =
        MetadataClient::new(CloudKind::Azure, Some(loopback(&ep))).unwrap().with_timeout(Duration::from_millis(200));
    let err = client.poll_notice().await.unwrap_err();
    assert!(matches!(&err, CloudError::Timeout { path, ms: 200 } if path == AZURE_EVENTS), "{err:?}");
    task.abort();

    let (ep, task) = raw_server("HTTP/1.1 200 OK\r\nContent-Length: nonsense\r\n\r\n", 10).await;
    let client = MetadataClient::new(CloudKind::Azure, Some(loopback(&ep))).unwrap();
    let err = client.discover().await.unwrap_err();
    assert!(matches!(err, CloudError::Transport { .. }), "{err:?}");
    task.abort();
}

#[tokio::test]
async fn nothing_listening_is_a_transport_error() {
    let fake = FakeAws::start().await.unwrap();
    let ep = fake.endpoint();
    drop(fake);
    let client = MetadataClient::new(CloudKind::Aws, Some(loopback(&ep))).unwrap();
    // The fake stops once its task is cancelled; allow the runtime a moment to do it.
    let mut last = None;
    for _ in 0..100 {
        match client.discover().await {
            Err(CloudError::Transport { .. }) => return,
            other => last = Some(other),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the dropped fake still answers: {last:?}");
}

// ---- Azure

#[tokio::test]
async fn azure_discover() {
    let (fake, client) = azure().await;
    let info = client.discover().await.unwrap();
    assert_eq!(
        info,
        CloudInfo {
            region: "eastus".into(),
            zone: "eastus-2".into(),
            instance_type: "Standard_ND96isr_H100_v5".into(),
            spot: true,
            instance_id: "02aab8a4-74ef-476e-8182-f6d2ba4166a6".into(),
        }
    );
    for (priority, zone, spot, want_zone) in
        [("Regular", "", false, "westus3-0"), ("", "1", false, "westus3-1"), ("Low", "3", true, "westus3-3")]
    {
        fake.set_identity(AzureIdentity {
            location: "westus3".into(),
            zone: zone.into(),
            priority: priority.into(),
            ..AzureIdentity::default()
        });
        let info = client.discover().await.unwrap();
        assert_eq!((info.spot, info.zone.as_str(), info.region.as_str()), (spot, want_zone, "westus3"), "{priority}");
    }
}

#[tokio::test]
async fn azure_fake_requires_the_metadata_header() {
    let fake = FakeAzure::start().await.unwrap();
    let ep = fake.endpoint();
    assert_eq!(raw(&ep, Method::GET, AZURE_INSTANCE, &[]).await.status, 400);
    assert_eq!(raw(&ep, Method::GET, AZURE_EVENTS, &[("metadata", "false")]).await.status, 400);
    assert_eq!(raw(&ep, Method::GET, "/metadata/instance", &[("metadata", "true")]).await.status, 400);
    assert_eq!(fake.rejected_requests(), 3);
    assert_eq!(raw(&ep, Method::GET, AZURE_INSTANCE, &[("Metadata", "true")]).await.status, 200);
}

#[tokio::test]
async fn azure_bad_instance_documents_name_the_field() {
    let (fake, client) = azure().await;
    fake.set_identity(AzureIdentity { priority: "Premium".into(), ..AzureIdentity::default() });
    assert_eq!(field_of(&client.discover().await.unwrap_err()), "compute.priority");
    fake.set_identity(AzureIdentity { vm_size: "".into(), ..AzureIdentity::default() });
    assert_eq!(field_of(&client.discover().await.unwrap_err()), "compute.vmSize");
    fake.set_identity(AzureIdentity { zone: "1 2".into(), ..AzureIdentity::default() });
    assert_eq!(field_of(&client.discover().await.unwrap_err()), "compute.zone");
    let deep = "[".repeat(100_000);
    let cases: [(&str, &str); 6] = [
        ("{}", "compute"),
        ("{\"compute\": []}", "compute"),
        ("{\"compute\": {\"vmSize\": 5}}", "compute.vmSize"),
        ("{\"compute\": {\"vmSize\": \"x\", \"vmId\": \"y\"}}", "compute.location"),
        ("{\"compute\": {\"vmSize\": \"x\", \"vmId\": \"y\", \"location\": \"z\", \"zone\": 1}}", "compute.zone"),
        (&deep, "body"),
    ];
    for (body, field) in cases {
        fake.override_path("/metadata/instance", 200, body.to_string());
        let err = client.discover().await.unwrap_err();
        assert_eq!(field_of(&err), field, "{}", &body[..body.len().min(80)]);
        assert!(err.to_string().starts_with(AZURE_INSTANCE), "{err}");
    }
}

#[tokio::test]
async fn azure_notices() {
    let (fake, client) = azure().await;
    assert_eq!(client.poll_notice().await.unwrap(), None);
    fake.post_event("reboot-1", "Reboot", "Mon, 19 Sep 2016 18:29:47 GMT");
    fake.post_event("freeze-1", "Freeze", "Mon, 19 Sep 2016 18:29:47 GMT");
    assert_eq!(client.poll_notice().await.unwrap(), None, "only Preempt and Terminate count");
    fake.post_preempt("602d9444-d2cd-49c7-8624-8643e7171297", "Mon, 19 Sep 2016 18:29:47 GMT");
    fake.post_terminate("terminate-1", "Thu, 26 Nov 2026 12:34:56 GMT");
    let n = client.poll_notice().await.unwrap().unwrap();
    assert_eq!(n.kind, NoticeKind::AzurePreempt);
    assert_eq!(n.event_id, "602d9444-d2cd-49c7-8624-8643e7171297");
    assert_eq!(n.deadline_unix_ms, 1_474_309_787_000);
    assert!(n.detail.starts_with("Preempt (Scheduled)"), "{}", n.detail);

    fake.clear_events();
    fake.post_event("redeploy-1", "Redeploy", "");
    fake.post_terminate("terminate-1", "Thu, 26 Nov 2026 12:34:56 GMT");
    let n = client.poll_notice().await.unwrap().unwrap();
    assert_eq!(
        (n.kind, n.event_id.as_str(), n.deadline_unix_ms),
        (NoticeKind::AzureTerminate, "terminate-1", 1_795_696_496_000)
    );
}

#[tokio::test]
async fn azure_started_preempt_gets_the_minimum_notice() {
    let (fake, client) = azure().await;
    fake.post_preempt("p", "");
    let before = now_unix_ms();
    let n = client.poll_notice().await.unwrap().unwrap();
    let after = now_unix_ms();
    let notice = AZURE_PREEMPT_DEFAULT_NOTICE.as_millis() as u64;
    assert!((before + notice..=after + notice).contains(&n.deadline_unix_ms), "{n:?}");
    fake.clear_events();
    fake.post_terminate("t", "");
    let n = client.poll_notice().await.unwrap().unwrap();
    assert!(n.deadline_unix_ms <= now_unix_ms(), "a started Terminate is due now: {n:?}");
}

#[tokio::test]
async fn azure_acknowledge_approves_the_event() {
    let (fake, client) = azure().await;
    fake.post_preempt("evt-1", "Mon, 19 Sep 2016 18:29:47 GMT");
    let n = client.poll_notice().await.unwrap().unwrap();
    client.acknowledge(&n.event_id).await.unwrap();
    assert_eq!(fake.acknowledged(), vec!["evt-1".to_string()]);
    let n = client.poll_notice().await.unwrap().unwrap();
    assert!(n.detail.starts_with("Preempt (Started)"), "{}", n.detail);
    assert!(matches!(client.acknowledge("").await, Err(CloudError::Malformed { .. })));
    assert!(matches!(client.acknowledge("has space").await, Err(CloudError::Malformed { .. })));
    assert_eq!(fake.acknowledged().len(), 1);
    // AWS has nothing to approve.
    let (aws_fake, aws_client) = aws().await;
    aws_client.acknowledge("evt-1").await.unwrap();
    assert_eq!(aws_fake.token_requests(), 0);
}

#[tokio::test]
async fn azure_bad_event_documents_name_the_field() {
    let (fake, client) = azure().await;
    fake.post_preempt("p", "Mon, 19 Sep 2016 18:29:47");
    let err = client.poll_notice().await.unwrap_err();
    assert_eq!(field_of(&err), "Events[0].NotBefore");
    assert!(err.to_string().contains("Events[0].NotBefore"), "{err}");
    fake.clear_events();
    fake.post_event("r", "Reboot", "garbage is ignored for other types");
    fake.post_terminate("t", "Mon, 31 Sep 2016 18:29:47 GMT");
    assert_eq!(field_of(&client.poll_notice().await.unwrap_err()), "Events[1].NotBefore");
    let cases: [(&str, &str); 8] = [
        ("not json", "body"),
        ("[]", "body"),
        ("{\"DocumentIncarnation\": 1}", "Events"),
        ("{\"Events\": {}}", "Events"),
        ("{\"Events\": [7]}", "Events[0]"),
        ("{\"Events\": [{\"EventId\": \"x\"}]}", "Events[0].EventType"),
        ("{\"Events\": [{\"EventType\": \"Preempt\", \"NotBefore\": \"\"}]}", "Events[0].EventId"),
        ("{\"Events\": [{\"EventType\": \"Terminate\", \"EventId\": \"x\", \"NotBefore\": 5}]}", "Events[0].NotBefore"),
    ];
    for (body, field) in cases {
        fake.override_path("/metadata/scheduledevents", 200, body);
        let err = client.poll_notice().await.unwrap_err();
        assert_eq!(field_of(&err), field, "{body}");
    }
    fake.override_path("/metadata/scheduledevents", 503, "");
    assert!(matches!(client.poll_notice().await, Err(CloudError::Status { status: 503, .. })));
}
