//! The PostgreSQL sink against a real server: replays change nothing, checkpoints never move
//! backwards, a final replaces its updates, and every column of every output row arrives
//! exactly through the binary COPY (separators and backslashes in strings, NaN, infinities,
//! -0.0, the ends of the timestamp range, arrays empty and long).

mod common;

use common::fresh_db;
use neurostream::config::WindowKind;
use neurostream::output::{
    ClusterUpdate, DriftRecord, Emitted, OutlierRecord, Output, WindowAggregate,
};
use std::time::Duration;

use neurostream::store::{Batch, Checkpoint, Epoch, PartitionId, PgStore, RejectedRow, Store};

fn window(key: &str, start: i64, count: u64, is_final: bool, revision: u32) -> Emitted {
    Emitted {
        seq: 0,
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

fn drift(offset: i64, affected: Vec<u64>, recommendation: &str) -> Emitted {
    Emitted {
        seq: 0,
        source_offset: offset,
        output: Output::DriftDetection(DriftRecord {
            partition: 0,
            severity: "high".into(),
            affected_clusters: affected,
            detector: "adwin".into(),
            statistic: 2.5,
            recommendation: recommendation.into(),
            detected_at: 1_700_000_000_000,
        }),
    }
}

/// Commits `outputs`, which PostgreSQL must refuse in part; the refused rows, each with a reason.
async fn refused(store: &Store, epoch: Epoch, outputs: &[Emitted]) -> Vec<RejectedRow> {
    let id = id();
    let checkpoint = Checkpoint::full(outputs.len() as i64, b"s".to_vec());
    let batch = Batch {
        id: &id,
        epoch,
        outputs,
        checkpoint: &checkpoint,
    };
    let rejected = match store.commit(&batch).await {
        Err(neurostream::store::StoreError::Rejected(rows)) => rows,
        other => panic!("expected rejected rows, got {other:?}"),
    };
    assert!(
        rejected.iter().all(|r| !r.reason.is_empty()),
        "{rejected:?}"
    );
    assert_eq!(store.load(&id).await.unwrap(), None, "nothing committed");
    rejected
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
    let checkpoint = Checkpoint::full(10, b"state-10".to_vec());
    let id = id();
    let (epoch, _) = store.claim(&id).await.unwrap();
    let batch = Batch {
        id: &id,
        epoch,
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
async fn alarms_of_one_detector_at_one_offset_are_all_kept_and_replays_add_none() {
    // Two clusters vanishing at the same refresh: two alarms of one detector at one offset.
    let (_, pg) = fresh_db().await;
    let store = Store::Postgres(pg.clone());
    let outputs = vec![
        drift(7, vec![1], "a"),
        drift(7, vec![2], "b"),
        drift(8, vec![1], "c"),
    ];
    let checkpoint = Checkpoint::full(9, b"s".to_vec());
    let id = id();
    let (epoch, _) = store.claim(&id).await.unwrap();
    let batch = Batch {
        id: &id,
        epoch,
        outputs: &outputs,
        checkpoint: &checkpoint,
    };
    store.commit(&batch).await.unwrap();
    store.commit(&batch).await.unwrap();
    let rows: Vec<(i64, Vec<i64>)> =
        sqlx::query_as("SELECT source_offset, affected_clusters FROM drift_alerts ORDER BY 1, 2")
            .fetch_all(pg.pool())
            .await
            .unwrap();
    assert_eq!(rows, vec![(7, vec![1]), (7, vec![2]), (8, vec![1])]);
}

#[tokio::test]
async fn checkpoints_never_move_backwards() {
    let (_, pg) = fresh_db().await;
    let store = Store::Postgres(pg);
    let id = id();
    let (epoch, _) = store.claim(&id).await.unwrap();
    for (next, state) in [(20, "new"), (10, "stale zombie")] {
        let checkpoint = Checkpoint::full(next, state.as_bytes().to_vec());
        store
            .commit(&Batch {
                id: &id,
                epoch,
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
    let (epoch, _) = store.claim(&id).await.unwrap();
    let commit = |outputs: Vec<Emitted>, next: i64| {
        let store = store.clone();
        let id = id.clone();
        async move {
            let checkpoint = Checkpoint::full(next, vec![]);
            store
                .commit(&Batch {
                    id: &id,
                    epoch,
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

/// Two workers race on one partition: once the second has claimed it, no batch of the first
/// commits, and the second starts from the last checkpoint the first could write.
#[tokio::test]
async fn a_stale_owner_can_never_commit_after_the_next_owner_claimed() {
    let (_, pg) = fresh_db().await;
    let store = Store::Postgres(pg.clone());
    let id = id();
    let (old, _) = store.claim(&id).await.unwrap();
    // The old owner commits batches as fast as it can while the new owner claims.
    let writer = {
        let (store, id) = (store.clone(), id.clone());
        tokio::spawn(async move {
            let mut committed = Vec::new();
            for next in 1..=400i64 {
                let outputs = vec![window("old", next * 1_000, 1, true, 0)];
                let checkpoint = Checkpoint::full(next, format!("old-{next}").into_bytes());
                let batch = Batch {
                    id: &id,
                    epoch: old,
                    outputs: &outputs,
                    checkpoint: &checkpoint,
                };
                match store.commit(&batch).await {
                    Ok(_) => committed.push(next),
                    Err(neurostream::store::StoreError::Fenced { mine, current }) => {
                        assert_eq!((mine, current), (old, old + 1));
                        return (committed, Some(next));
                    }
                    Err(err) => panic!("unexpected {err}"),
                }
            }
            (committed, None)
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let (new, checkpoint) = store.claim(&id).await.unwrap();
    assert_eq!(new, old + 1);
    let (committed, fenced_at) = writer.await.unwrap();
    let fenced_at = fenced_at.expect("the old owner was fenced before it finished");
    // The new owner read exactly the last batch the old owner committed.
    let last = *committed
        .last()
        .expect("some batches committed before the claim");
    assert_eq!(fenced_at, last + 1);
    let checkpoint = checkpoint.unwrap();
    assert_eq!(checkpoint.next_offset, last);
    assert_eq!(checkpoint.state, format!("old-{last}").into_bytes());
    // Nothing of a fenced batch reached the tables.
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM window_aggregates")
        .fetch_one(pg.pool())
        .await
        .unwrap();
    assert_eq!(rows, last);
    // And the new owner commits.
    let outputs = vec![window("new", 0, 1, true, 0)];
    let cp = Checkpoint::full(last + 1, b"new".to_vec());
    store
        .commit(&Batch {
            id: &id,
            epoch: new,
            outputs: &outputs,
            checkpoint: &cp,
        })
        .await
        .unwrap();
}

/// A row PostgreSQL refuses (here a NUL in a key, which the decoder never lets through) is
/// named; committing without it then succeeds.
#[tokio::test]
async fn refused_rows_are_named_and_the_rest_commits() {
    let (_, pg) = fresh_db().await;
    let store = Store::Postgres(pg.clone());
    let id = id();
    let (epoch, _) = store.claim(&id).await.unwrap();
    let mut outputs = vec![
        window("fine", 0, 1, true, 0),
        window("nul\0inside", 0, 1, true, 0),
        window("also fine", 0, 2, true, 0),
        // Incompressible, over the btree's 2,704-byte index row limit.
        window(&incompressible(3_000), 0, 1, true, 0),
    ];
    let rejected = refused(&store, epoch, &outputs).await;
    let indices: Vec<usize> = rejected.iter().map(|r| r.index).collect();
    assert_eq!(indices, vec![1, 3], "{rejected:?}");
    let checkpoint = Checkpoint::full(4, b"s".to_vec());
    outputs.remove(3);
    outputs.remove(1);
    let batch = Batch {
        id: &id,
        epoch,
        outputs: &outputs,
        checkpoint: &checkpoint,
    };
    assert_eq!(store.commit(&batch).await.unwrap(), 2);
    assert_eq!(store.load(&id).await.unwrap(), Some(checkpoint));
}

/// With one connection in the pool (the row search used to wait for a second one for ever) and
/// a batch large enough that trying each row alone outlasted the commit timeout: the refused
/// rows are named all the same, in order.
#[tokio::test]
async fn refused_rows_are_found_in_a_large_batch_on_a_single_connection() {
    let (url, _) = fresh_db().await;
    let store = Store::Postgres(PgStore::connect_lazy(&url, 1).unwrap());
    let id = id();
    let (epoch, _) = store.claim(&id).await.unwrap();
    let bad = [0, 4_321, 4_322, 19_999];
    let outputs: Vec<Emitted> = (0..20_000)
        .map(|i| {
            let key = if bad.contains(&i) {
                format!("nul\0{i}")
            } else {
                format!("k{i}")
            };
            window(&key, 0, 1, true, 0)
        })
        .collect();
    let rejected = refused(&store, epoch, &outputs).await;
    let indices: Vec<usize> = rejected.iter().map(|r| r.index).collect();
    assert_eq!(indices, bad, "{rejected:?}");
}

/// A commit cut while PostgreSQL is still inside its COPY (the commit timeout, or a caller
/// giving up): the connection is not handed out again out of step with the protocol. Before,
/// the next commit on it read the previous statement's reply and saw no owner row: "fenced",
/// for good.
#[tokio::test]
async fn a_commit_cut_inside_its_copy_does_not_poison_the_pool() {
    let (url, admin) = fresh_db().await;
    // One connection: the commit after the cut gets the same pool slot.
    let pg = PgStore::connect_lazy(&url, 1)
        .unwrap()
        .with_commit_timeout(Duration::from_millis(400));
    let store = Store::Postgres(pg.clone());
    let id = id();
    let (epoch, _) = store.claim(&id).await.unwrap();
    for statement in [
        "CREATE FUNCTION stall() RETURNS trigger LANGUAGE plpgsql AS
         $$ BEGIN PERFORM pg_sleep(2); RETURN NEW; END $$",
        "CREATE TRIGGER stall BEFORE INSERT ON window_aggregates
         FOR EACH ROW EXECUTE FUNCTION stall()",
    ] {
        sqlx::query(statement).execute(admin.pool()).await.unwrap();
    }
    let outputs = vec![window("a", 0, 1, true, 0)];
    let checkpoint = Checkpoint::full(1, b"after".to_vec());
    let batch = Batch {
        id: &id,
        epoch,
        outputs: &outputs,
        checkpoint: &checkpoint,
    };
    // Cut by the caller, then by the store's own timeout.
    let cut = tokio::time::timeout(Duration::from_millis(200), store.commit(&batch)).await;
    assert!(cut.is_err(), "the COPY stalls for 2 s: {cut:?}");
    // (The server's own statement timeout may answer first: retryable all the same.)
    let timed_out = store.commit(&batch).await;
    assert!(
        matches!(&timed_out, Err(e) if e.is_retryable()),
        "{timed_out:?}"
    );
    // Waits for the cut transactions to end (their locks on the table).
    sqlx::query("DROP TRIGGER stall ON window_aggregates")
        .execute(admin.pool())
        .await
        .unwrap();
    assert_eq!(store.commit(&batch).await.unwrap(), 1);
    assert_eq!(store.load(&id).await.unwrap(), Some(checkpoint.clone()));
    assert_eq!(dump(&pg).await, vec![("a".into(), 1, true, 0)]);
}

fn incompressible(len: usize) -> String {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'!' + (x % 90) as u8)
        })
        .collect()
}

/// "Active in the last hour" is event time: clusters of a replayed 2001 stream are active when
/// they were updated within an hour of the partition's latest update, whatever the wall clock.
#[tokio::test]
async fn clusters_active_last_hour_uses_event_time() {
    let (_, pg) = fresh_db().await;
    for (id, updated) in [
        (1, "2001-01-01 12:00+00"),
        (2, "2001-01-01 11:30+00"),
        (3, "2001-01-01 10:00+00"),
    ] {
        sqlx::query(
            "INSERT INTO clusters (source_topic, partition, cluster_id, centroid, weight, radius,
                                   status, created_at, updated_at, source_offset)
             VALUES ('events', 0, $1, '{0}', 1, 1, 'active', $2::timestamptz, $2::timestamptz, $1)",
        )
        .bind(id as i64)
        .bind(updated)
        .execute(pg.pool())
        .await
        .unwrap();
    }
    let mut active: Vec<(i64,)> =
        sqlx::query_as("SELECT cluster_id FROM clusters_active_last_hour")
            .fetch_all(pg.pool())
            .await
            .unwrap();
    active.sort();
    assert_eq!(active, vec![(1,), (2,)]);
}

/// Extreme floats the decoder accepts round-trip through COPY exactly.
#[tokio::test]
async fn extreme_floats_round_trip_exactly() {
    let (_, pg) = fresh_db().await;
    let store = Store::Postgres(pg.clone());
    let id = id();
    let (epoch, _) = store.claim(&id).await.unwrap();
    let values = [5e-324, 1e-300, -1e100, 1e100, 0.1, -0.0];
    let outputs: Vec<Emitted> = values
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let mut e = window(&format!("k{i}"), 0, 1, true, 0);
            if let Output::WindowAggregate(w) = &mut e.output {
                (w.sum, w.mean, w.min, w.max) = (x, Some(x), Some(x), Some(x));
            }
            e
        })
        .collect();
    let checkpoint = Checkpoint::full(1, vec![]);
    let batch = Batch {
        id: &id,
        epoch,
        outputs: &outputs,
        checkpoint: &checkpoint,
    };
    store.commit(&batch).await.unwrap();
    let rows: Vec<(String, f64, Option<f64>)> =
        sqlx::query_as("SELECT key, sum, min FROM window_aggregates ORDER BY key")
            .fetch_all(pg.pool())
            .await
            .unwrap();
    for (i, (_, sum, min)) in rows.iter().enumerate() {
        assert_eq!(sum.to_bits(), values[i].to_bits(), "row {i}");
        assert_eq!(min.unwrap().to_bits(), values[i].to_bits(), "row {i}");
    }
}

/// A checkpoint chain: a base, deltas appended in order (the chain's next offset follows them),
/// a delta behind the chain or naming another base refused, a new base dropping the old
/// deltas; the same in the in-memory store. A delta before any base is refused. The base row
/// keeps its own offset, so a binary that knows no deltas reads a consistent pair.
#[tokio::test]
async fn checkpoint_deltas_chain_after_their_base_and_a_new_base_drops_them() {
    let (_, pg) = fresh_db().await;
    for store in [
        Store::Postgres(pg),
        Store::Memory(neurostream::store::MemoryStore::default()),
    ] {
        let id = id();
        let (epoch, none) = store.claim(&id).await.unwrap();
        assert_eq!(none, None);
        let commit = |checkpoint: Checkpoint| {
            let (store, id) = (store.clone(), id.clone());
            async move {
                store
                    .commit(&Batch {
                        id: &id,
                        epoch,
                        outputs: &[],
                        checkpoint: &checkpoint,
                    })
                    .await
            }
        };
        let err = commit(Checkpoint::delta(5, 5, b"orphan".to_vec()))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("before any full checkpoint"),
            "{err}"
        );

        commit(Checkpoint::full(10, b"base".to_vec()))
            .await
            .unwrap();
        commit(Checkpoint::delta(12, 10, b"d1".to_vec()))
            .await
            .unwrap();
        commit(Checkpoint::delta(12, 10, b"d2".to_vec()))
            .await
            .unwrap(); // a tick: same offset
        let err = commit(Checkpoint::delta(11, 10, b"stale".to_vec()))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("move the checkpoint back"),
            "{err}"
        );
        let err = commit(Checkpoint::delta(13, 9, b"other base".to_vec()))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("stored base is at 10"), "{err}");
        commit(Checkpoint::delta(15, 10, b"d3".to_vec()))
            .await
            .unwrap();
        let want = Checkpoint {
            next_offset: 15,
            state: b"base".to_vec(),
            deltas: vec![b"d1".to_vec(), b"d2".to_vec(), b"d3".to_vec()],
            base_offset: 10,
        };
        assert_eq!(store.load(&id).await.unwrap(), Some(want.clone()));
        if let Store::Postgres(pg) = &store {
            let (base, progress): (i64, i64) = sqlx::query_as(
                "SELECT c.next_offset, p.next_offset FROM partition_checkpoints c
                 JOIN partition_progress p USING (group_id, source_topic, partition)",
            )
            .fetch_one(pg.pool())
            .await
            .unwrap();
            assert_eq!((base, progress), (10, 15), "the base keeps its own offset");
        }
        // A base behind the chain's head changes nothing (as a base behind a base).
        commit(Checkpoint::full(12, b"behind".to_vec()))
            .await
            .unwrap();
        assert_eq!(store.load(&id).await.unwrap(), Some(want.clone()));
        // The next owner's claim reads the same chain.
        let (epoch2, claimed) = store.claim(&id).await.unwrap();
        assert_eq!(claimed, Some(want));

        let (store2, id2) = (store.clone(), id.clone());
        store2
            .commit(&Batch {
                id: &id2,
                epoch: epoch2,
                outputs: &[],
                checkpoint: &Checkpoint::full(16, b"base2".to_vec()),
            })
            .await
            .unwrap();
        store2
            .commit(&Batch {
                id: &id2,
                epoch: epoch2,
                outputs: &[],
                checkpoint: &Checkpoint::delta(17, 16, b"e1".to_vec()),
            })
            .await
            .unwrap();
        assert_eq!(
            store.load(&id).await.unwrap(),
            Some(Checkpoint {
                next_offset: 17,
                state: b"base2".to_vec(),
                deltas: vec![b"e1".to_vec()],
                base_offset: 16,
            })
        );
        // The old owner is fenced for deltas as for bases.
        assert!(matches!(
            commit(Checkpoint::delta(30, 16, b"zombie".to_vec())).await,
            Err(neurostream::store::StoreError::Fenced { .. })
        ));
    }
}

/// Every column of every row kind round-trips exactly through the binary COPY, with what the
/// text format needed escaping for (tabs, newlines, backslashes) and the values at the edges.
#[tokio::test]
async fn every_column_round_trips_exactly() {
    let (_, pg) = fresh_db().await;
    let store = Store::Postgres(pg.clone());
    let id = id();
    let (epoch, _) = store.claim(&id).await.unwrap();
    let hostile = "tab\there\nnew line \\N back\\slash \u{e9}\u{1F600}";
    // Year 1 and year 9999 (the decoder's range), and what is beyond microseconds: infinity.
    let (first, last) = (-62_135_596_800_000, 253_402_300_799_999);
    let mut outputs = vec![
        window(hostile, first, 3, true, 0),
        window("k", last, u64::from(u32::MAX), false, 7),
        window("open", 1_000, 1, false, 0),
    ];
    if let Output::WindowAggregate(w) = &mut outputs[1].output {
        (w.sum, w.mean, w.std, w.min, w.max) = (
            f64::NAN,
            None,
            Some(-0.0),
            Some(f64::NEG_INFINITY),
            Some(f64::INFINITY),
        );
    }
    if let Output::WindowAggregate(w) = &mut outputs[2].output {
        w.window_end = i64::MAX;
    }
    let centroid: Vec<f64> = (0..64).map(|i| f64::from(i) * -0.25).collect();
    outputs.push(Emitted {
        seq: 0,
        source_offset: 40,
        output: Output::ClusterUpdate(ClusterUpdate {
            partition: 0,
            cluster_id: u64::from(u32::MAX) + 5,
            event: "created".into(),
            centroid: centroid.clone(),
            weight: 1e-300,
            radius: 5e-324,
            quality: 1.0,
            drift_coefficient: -0.0,
            created_at: first,
            updated_at: 1_700_000_000_123,
        }),
    });
    outputs.push(drift(41, vec![], hostile));
    outputs.push(drift(42, vec![3, i64::MAX as u64], hostile));
    for (offset, event_id) in [(43, None), (44, Some(hostile.to_string()))] {
        outputs.push(Emitted {
            seq: 0,
            source_offset: offset,
            output: Output::Outlier(OutlierRecord {
                partition: 0,
                offset,
                id: event_id,
                key: hostile.into(),
                ts: last,
                features: vec![],
                outlier_score: 0.999,
                reason: "score".into(),
                metadata: None,
            }),
        });
    }
    let checkpoint = Checkpoint::full(45, vec![]);
    let batch = Batch {
        id: &id,
        epoch,
        outputs: &outputs,
        checkpoint: &checkpoint,
    };
    assert_eq!(store.commit(&batch).await.unwrap(), 8);

    type WindowRow = (
        String,
        i64,
        Option<i64>,
        i64,
        f64,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        bool,
        i32,
        i64,
    );
    let windows: Vec<WindowRow> = sqlx::query_as(
        "SELECT key, (extract(epoch FROM window_start) * 1000)::bigint,
                CASE WHEN isfinite(window_end) THEN (extract(epoch FROM window_end) * 1000)::bigint END,
                count, sum, mean, std, min, max, is_final, revision, source_offset
         FROM window_aggregates ORDER BY window_start",
    )
    .fetch_all(pg.pool())
    .await
    .unwrap();
    assert_eq!(windows.len(), 3);
    let w = &windows[0];
    assert_eq!(
        (w.0.as_str(), w.1, w.2, w.3),
        (hostile, first, Some(first + 1_000), 3)
    );
    assert_eq!((w.9, w.10, w.11), (true, 0, first));
    let (open, edge) = (&windows[1], &windows[2]);
    assert_eq!((open.0.as_str(), open.2), ("open", None), "infinity");
    assert_eq!((edge.1, edge.3, edge.10), (last, i64::from(u32::MAX), 7));
    assert!(edge.4.is_nan());
    assert_eq!(edge.5, None);
    assert_eq!(edge.6.map(f64::to_bits), Some((-0.0f64).to_bits()));
    assert_eq!(
        (edge.7, edge.8),
        (Some(f64::NEG_INFINITY), Some(f64::INFINITY))
    );

    let (cluster_id, stored, weight, radius, drift, created): (i64, Vec<f64>, f64, f64, f64, i64) =
        sqlx::query_as(
            "SELECT cluster_id, centroid, weight, radius, drift_coefficient,
                    (extract(epoch FROM created_at) * 1000)::bigint
             FROM cluster_updates",
        )
        .fetch_one(pg.pool())
        .await
        .unwrap();
    assert_eq!(cluster_id, i64::from(u32::MAX) + 5);
    assert_eq!(
        stored.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        centroid.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(
        (weight, radius, drift.to_bits(), created),
        (1e-300, 5e-324, (-0.0f64).to_bits(), first)
    );

    let drifts: Vec<(Vec<i64>, String)> = sqlx::query_as(
        "SELECT affected_clusters, recommendation FROM drift_alerts ORDER BY source_offset",
    )
    .fetch_all(pg.pool())
    .await
    .unwrap();
    assert_eq!(
        drifts,
        vec![
            (vec![], hostile.to_string()),
            (vec![3, i64::MAX], hostile.to_string())
        ]
    );

    let outliers: Vec<(Option<String>, String, i64, Vec<f64>)> = sqlx::query_as(
        "SELECT event_id, key, (extract(epoch FROM ts) * 1000)::bigint, features
         FROM outliers ORDER BY source_offset",
    )
    .fetch_all(pg.pool())
    .await
    .unwrap();
    assert_eq!(
        outliers,
        vec![
            (None, hostile.to_string(), last, vec![]),
            (Some(hostile.to_string()), hostile.to_string(), last, vec![]),
        ]
    );
}

/// A value its column cannot hold (a count over bigint's range, a drift naming a cluster id
/// over it, a timestamp outside PostgreSQL's range) is refused for its row alone, with a reason.
#[tokio::test]
async fn values_out_of_their_columns_range_are_refused_by_row() {
    let (_, pg) = fresh_db().await;
    let store = Store::Postgres(pg.clone());
    let id = id();
    let (epoch, _) = store.claim(&id).await.unwrap();
    let mut outputs = vec![
        window("fine", 0, 1, true, 0),
        window("too many", 0, u64::MAX, true, 0),
        // Year 29,719 BC: microseconds hold it, PostgreSQL's timestamps do not.
        window("too early", -1_000_000_000_000_000, 1, true, 0),
    ];
    outputs.push(drift(9, vec![1, u64::MAX], ""));
    let rejected = refused(&store, epoch, &outputs).await;
    let indices: Vec<usize> = rejected.iter().map(|r| r.index).collect();
    assert_eq!(indices, vec![1, 2, 3], "{rejected:?}");
}

/// Checkpoint bytes are compressed with lz4 where the server has it (this one does: Debian's
/// PostgreSQL 15 is built with lz4); pglz took 3.5 s for a 1 M-key base.
#[tokio::test]
async fn checkpoint_columns_compress_with_lz4() {
    let (_, pg) = fresh_db().await;
    let methods: Vec<(String, String)> = sqlx::query_as(
        "SELECT attrelid::regclass::text, attcompression::text FROM pg_attribute
         WHERE (attrelid, attname) IN (('partition_checkpoints'::regclass, 'state'),
                                       ('partition_checkpoint_deltas'::regclass, 'delta'))
         ORDER BY 1",
    )
    .fetch_all(pg.pool())
    .await
    .unwrap();
    assert_eq!(
        methods,
        vec![
            ("partition_checkpoint_deltas".to_string(), "l".to_string()),
            ("partition_checkpoints".to_string(), "l".to_string()),
        ]
    );
}
