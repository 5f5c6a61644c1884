"""Ghosts: indexed pods that a re-listing after a watch gap did not mention are dropped."""

from finetune_operator.ghosts import LISTING_QUIET_SECONDS, Ghosts


def test_a_pod_missing_from_a_relisting_is_a_ghost_once_it_is_quiet():
    ghosts = Ghosts()
    assert ghosts.saw("a", None, 0.0) and not ghosts.saw("b", None, 0.1)  # the startup listing
    assert ghosts.sweep({"a", "b"}, 10.0) == set()  # both listed
    ghosts.saw("a", "MODIFIED", 20.0)
    # A watch gap: "b" was deleted meanwhile and kopf re-lists only "a"; "c" is created during the listing.
    assert ghosts.saw("a", None, 100.0)
    ghosts.saw("c", "ADDED", 100.5)
    assert ghosts.quiet_in(101.0) == LISTING_QUIET_SECONDS - 1.0
    assert ghosts.sweep({"a", "b", "c"}, 101.0) == set()  # still listing: nothing is decided
    assert ghosts.sweep({"a", "b", "c"}, 100.0 + LISTING_QUIET_SECONDS) == {"b"}
    assert ghosts.uids == {"b"}


def test_a_deletion_event_forgets_the_pod_and_the_reconcilers_findings_are_kept():
    ghosts = Ghosts()
    ghosts.add(["x"])
    ghosts.saw("x", "DELETED", 1.0)
    assert ghosts.uids == set()
    ghosts.add(["y"])
    assert ghosts.uids == {"y"}


def test_without_a_relisting_nothing_is_a_ghost():
    ghosts = Ghosts()
    ghosts.saw("a", "ADDED", 0.0)
    assert ghosts.sweep({"a", "b"}, 1000.0) == set()
