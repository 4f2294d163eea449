#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use aws_sdk_dynamodbstreams::types::{SequenceNumberRange, StreamRecord};

use super::*;

fn shard(id: &str, parent: Option<&str>) -> Shard {
    Shard::builder()
        .shard_id(id)
        .set_parent_shard_id(parent.map(str::to_string))
        .sequence_number_range(
            SequenceNumberRange::builder()
                .starting_sequence_number("1")
                .build(),
        )
        .build()
}

#[test]
fn children_wait_for_their_parents() {
    let all = [
        shard("a", None),
        shard("a1", Some("a")),
        shard("b", None),
        shard("b1", Some("b")),
        shard("c1", Some("c")),
        shard("c", None),
    ];
    // Reading a (open); b was read to its end (known, closed); c is new, listed after its child.
    let open = BTreeMap::from([("a".to_string(), "it".to_string())]);
    let known: HashSet<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
    assert_eq!(to_adopt(&all, &open, &known), ["b1", "c"]);
}

fn s(v: &str) -> StreamValue {
    StreamValue::S(v.to_string())
}

fn n(v: u64) -> StreamValue {
    StreamValue::N(v.to_string())
}

fn record(op: OperationType, image: &[(&str, StreamValue)]) -> Record {
    let keys = HashMap::from([
        ("service".to_string(), s("web")),
        ("endpoint".to_string(), s("10.0.0.1:80")),
    ]);
    let image: HashMap<String, StreamValue> = keys
        .clone()
        .into_iter()
        .chain(image.iter().map(|(k, v)| (k.to_string(), v.clone())))
        .collect();
    let data = StreamRecord::builder().set_keys(Some(keys));
    let data = match op {
        OperationType::Remove => data.set_old_image(Some(image)),
        _ => data.set_new_image(Some(image)),
    };
    Record::builder()
        .event_name(op)
        .dynamodb(data.build())
        .build()
}

#[test]
fn records_become_changes_ordered_by_check_in_and_version() {
    let full = [("last_check_in", n(5)), ("version", n(3))];
    match change_of(&record(OperationType::Modify, &full)) {
        Some(Change::Upsert { row, version }) => {
            assert_eq!((row.last_check_in_ms, version), (5, 3));
            assert_eq!(row.endpoint.socket_addr().to_string(), "10.0.0.1:80");
        }
        other => panic!("{other:?}"),
    }
    let stamp = Stamp {
        last_check_in_ms: 5,
        version: 3,
    };
    match change_of(&record(OperationType::Remove, &full)) {
        Some(Change::Remove { stamp: got, .. }) => assert_eq!(got, stamp),
        other => panic!("{other:?}"),
    }
    // A row a foreign writer made unreadable, still ordered by its check-in time.
    let bad_tags = [
        ("last_check_in", n(5)),
        ("version", n(3)),
        ("tags", s("[1]")),
    ];
    match change_of(&record(OperationType::Modify, &bad_tags)) {
        Some(Change::Forget { stamp: got, .. }) => assert_eq!(got, stamp),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_key_only_image_says_nothing() {
    // moto records a new item's key alone before the update that fills it.
    assert_eq!(change_of(&record(OperationType::Insert, &[])), None);
}
