//! What ends an established HBONE connection (`watch_ending`), without a
//! network: certificates from temporary CAs, time paused.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use warren_pki::tls::{TrustBundle, WorkloadCertificate};

use super::{Ending, Watched, watch_ending};
use crate::{
    mesh::{Policies, Snapshot, Store},
    tls::testing::{TempCa, spiffe_id},
};

const LONG: Duration = Duration::from_secs(3600);

/// A connection whose peer presented `chain` and was checked against
/// `trust`; the store publishes the mesh's roots, the sender our renewals.
fn watched(
    trust: &TrustBundle,
    chain: &WorkloadCertificate,
    peer_expires_in: Duration,
) -> (
    Watched,
    Store,
    watch::Sender<Option<Arc<WorkloadCertificate>>>,
) {
    let store = Store::new(Snapshot::new(trust.clone(), Policies::none("istio-system")));
    let (renewals, renewed) = watch::channel(None);
    let watched = Watched {
        renewed,
        state: store.subscribe(),
        trust: store.current().trust().clone(),
        peer_chain: chain.chain().to_vec(),
        peer_expires_in,
        ours_expires_in: LONG,
    };
    (watched, store, renewals)
}

/// Runs `watch_ending`, returning what it says as it changes.
fn start(watched: Watched) -> watch::Receiver<Ending> {
    let (tx, rx) = watch::channel(Ending::Serving);
    tokio::spawn(watch_ending(tx, watched));
    rx
}

async fn next(ending: &mut watch::Receiver<Ending>) -> Ending {
    ending
        .changed()
        .await
        .expect("the watcher ended without a word");
    ending.borrow_and_update().clone()
}

#[tokio::test]
async fn a_renewal_winds_down_and_the_peers_expiry_then_revokes() {
    let ca = TempCa::new();
    let peer = ca
        .issue(&spiffe_id("spiffe://cluster.local/ns/default/sa/sleep"))
        .unwrap();
    let (watched, _store, renewals) =
        watched(&ca.trust_bundle(), &peer, Duration::from_millis(300));
    let mut ending = start(watched);
    renewals.send_replace(None);
    assert_eq!(next(&mut ending).await, Ending::WindDown);
    // Streams in flight finish, unless the peer's certificate runs out.
    assert_eq!(
        next(&mut ending).await,
        Ending::Revoked("the peer's certificate expired".into())
    );
}

#[tokio::test]
async fn removing_another_root_winds_down_and_removing_the_peers_revokes() {
    let (ours, other) = (TempCa::new(), TempCa::new());
    let peer = ours
        .issue(&spiffe_id("spiffe://cluster.local/ns/default/sa/sleep"))
        .unwrap();
    let both = ours.trust_bundle().merged(&other.trust_bundle());
    let (watched, store, _renewals) = watched(&both, &peer, LONG);
    let mut ending = start(watched);

    // A change that removes no root changes nothing.
    store.publish(|s| s.set_trust(both.clone()));
    let quiet = tokio::time::timeout(Duration::from_millis(200), ending.changed()).await;
    assert!(quiet.is_err(), "{:?}", *ending.borrow());
    // The other root goes: the peer still chains to ours.
    store.publish(|s| s.set_trust(ours.trust_bundle()));
    assert_eq!(next(&mut ending).await, Ending::WindDown);
    // Its own root goes.
    store.publish(|s| s.set_trust(other.trust_bundle()));
    assert_eq!(
        next(&mut ending).await,
        Ending::Revoked("the peer's certificate no longer chains to a trusted root".into())
    );
}
