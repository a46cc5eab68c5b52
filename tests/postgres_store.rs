//! The PostgreSQL sink against a real server: replays change nothing, checkpoints never move
//! backwards, a final replaces its updates, and keys survive COPY escaping.

mod common;

use common::fresh_db;
use neurostream::config::WindowKind;
use neurostream::output::{Emitted, Output, WindowAggregate};
use neurostream::store::{Batch, Checkpoint, PartitionId, Store};

fn window(key: &str, start: i64, count: u64, is_final: bool, revision: u32) -> Emitted {
    Emitted {
        source_offset: start,
        output: Output::WindowAggregate(WindowAggregate {
            partition: 0,
            window: WindowKind::Tumbling,
            size_ms: 1_000,
            slide_ms: 1_000,
            window_start: start,
            window_end: start + 1_000,
            key: key.into(),
            count,
            sum: count as f64 * 1.5,
            mean: Some(1.5),
            std: Some(0.0),
            min: Some(1.5),
            max: Some(1.5),
            is_final,
            revision,
        }),
    }
}

fn id() -> PartitionId {
    PartitionId {
        group_id: "g".into(),
        topic: "events".into(),
        partition: 0,
    }
}

async fn dump(store: &neurostream::store::PgStore) -> Vec<(String, i64, bool, i32)> {
    sqlx::query_as(
        "SELECT key, count, is_final, revision FROM window_aggregates ORDER BY key, window_start",
    )
    .fetch_all(store.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn a_replayed_batch_changes_nothing() {
    let (_, pg) = fresh_db().await;
    let store = Store::Postgres(pg.clone());
    let outputs = vec![
        window("a", 0, 3, true, 0),
        window("tab\there\\and\nnewline", 0, 1, true, 0),
        window("a", 1_000, 2, true, 0),
    ];
    let checkpoint = Checkpoint {
        next_offset: 10,
        state: b"state-10".to_vec(),
    };
    let id = id();
    let batch = Batch {
        id: &id,
        outputs: &outputs,
        checkpoint: &checkpoint,
    };
    assert_eq!(store.commit(&batch).await.unwrap(), 3);
    let before = dump(&pg).await;
    let (updated_before,): (chrono::DateTime<chrono::Utc>,) =
        sqlx::query_as("SELECT max(updated_at) FROM window_aggregates")
            .fetch_one(pg.pool())
            .await
            .unwrap();
    assert_eq!(
        store.commit(&batch).await.unwrap(),
        0,
        "replay touches no row"
    );
    assert_eq!(dump(&pg).await, before);
    let (updated_after,): (chrono::DateTime<chrono::Utc>,) =
        sqlx::query_as("SELECT max(updated_at) FROM window_aggregates")
            .fetch_one(pg.pool())
            .await
            .unwrap();
    assert_eq!(updated_before, updated_after);
    assert!(before.iter().any(|r| r.0 == "tab\there\\and\nnewline"));
    assert_eq!(store.load(&id).await.unwrap(), Some(checkpoint));
}

#[tokio::test]
async fn checkpoints_never_move_backwards() {
    let (_, pg) = fresh_db().await;
    let store = Store::Postgres(pg);
    let id = id();
    for (next, state) in [(20, "new"), (10, "stale zombie")] {
        let checkpoint = Checkpoint {
            next_offset: next,
            state: state.as_bytes().to_vec(),
        };
        store
            .commit(&Batch {
                id: &id,
                outputs: &[],
                checkpoint: &checkpoint,
            })
            .await
            .unwrap();
    }
    let loaded = store.load(&id).await.unwrap().unwrap();
    assert_eq!(loaded.next_offset, 20);
    assert_eq!(loaded.state, b"new");
}

#[tokio::test]
async fn a_final_replaces_updates_and_the_last_revision_wins_within_a_batch() {
    let (_, pg) = fresh_db().await;
    let store = Store::Postgres(pg.clone());
    let id = id();
    let commit = |outputs: Vec<Emitted>, next: i64| {
        let store = store.clone();
        let id = id.clone();
        async move {
            let checkpoint = Checkpoint {
                next_offset: next,
                state: vec![],
            };
            store
                .commit(&Batch {
                    id: &id,
                    outputs: &outputs,
                    checkpoint: &checkpoint,
                })
                .await
                .unwrap()
        }
    };
    commit(
        vec![window("k", 0, 1, false, 0), window("k", 0, 2, false, 1)],
        2,
    )
    .await;
    assert_eq!(dump(&pg).await, vec![("k".into(), 2, false, 1)]);
    commit(vec![window("k", 0, 3, true, 1)], 3).await;
    assert_eq!(dump(&pg).await, vec![("k".into(), 3, true, 1)]);
    // An older update arriving late (a replay) does not undo the final.
    commit(vec![window("k", 0, 2, false, 1)], 3).await;
    assert_eq!(dump(&pg).await, vec![("k".into(), 3, true, 1)]);
}

#[tokio::test]
async fn retryable_errors_are_classified() {
    let store =
        neurostream::store::PgStore::connect_lazy("postgres://nobody@127.0.0.1:1/none", 1).unwrap();
    let err = Store::Postgres(store).load(&id()).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
}
