"""Atomic artifact folders: replace only earlier artifacts of the same kind, never a user's files."""
from pathlib import Path

import pytest

from analysis.atomic import atomic_folder, check_replaceable
from tests.conftest import refuse_creation_in


def _write(folder, text: str) -> None:
    with atomic_folder(folder, ("marker",), "a test artifact") as tmp:
        (tmp / "marker").write_text(text)


def test_writes_new_and_empty_folders_and_replaces_its_own(tmp_path):
    _write(tmp_path / "a" / "b", "one")  # parents created
    assert (tmp_path / "a" / "b" / "marker").read_text() == "one"
    _write(tmp_path / "a" / "b", "two")  # an earlier artifact of the kind is replaced
    assert (tmp_path / "a" / "b" / "marker").read_text() == "two"
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty", "three")
    assert (tmp_path / "empty" / "marker").read_text() == "three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "empty"]  # no temp folder left


def test_refuses_a_foreign_folder_a_file_and_the_current_directory(tmp_path, monkeypatch):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    with pytest.raises(FileExistsError, match="not empty and does not hold a test artifact"):
        _write(mine, "x")
    assert (mine / "thesis.txt").read_text() == "years of work" and not (mine / "marker").exists()
    (tmp_path / "f.txt").write_text("a file")
    with pytest.raises(FileExistsError, match="is a file"):
        check_replaceable(tmp_path / "f.txt", ("marker",), "a test artifact")
    monkeypatch.chdir(mine)
    for where in (".", "..", str(mine)):
        with pytest.raises(FileExistsError, match="current directory"):
            check_replaceable(where, ("marker",), "a test artifact")
    assert (mine / "thesis.txt").exists()


def test_files_added_to_an_artifact_since_it_was_written_are_never_deleted(tmp_path):
    art = tmp_path / "art"
    with atomic_folder(art, ("marker",), "a test artifact") as tmp:
        (tmp / "marker").write_text("one")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "part").write_text("p")
    _write(art, "two")  # its own files only: replaced (sub/part went with it)
    assert not (art / "sub").exists() and (art / "marker").read_text() == "two"
    (art / "plan.json").write_text("the plan this run reads")
    (art / "notes").mkdir()
    (art / "notes" / "n.md").write_text("mine")
    with pytest.raises(FileExistsError, match=r"also files added since \(notes/n.md, plan.json\)"):
        _write(art, "three")
    assert (art / "plan.json").exists() and (art / "notes" / "n.md").exists()
    assert (art / "marker").read_text() == "two"
    with atomic_folder(art, ("marker",), "a cached thing", cache=True) as tmp:  # RankLab's own cache: replaced
        (tmp / "marker").write_text("cached")
    assert not (art / "plan.json").exists()
    (art / ".DS_Store").write_text("file browser junk")  # not a user's work: no reason to refuse
    _write(art, "three")
    assert (art / "marker").read_text() == "three"
    (art / "plan.json").write_text("the plan this run reads")
    (art / ".ranklab-files").unlink()  # written before manifests: its files cannot be told apart
    _write(art, "four")
    assert (art / "marker").read_text() == "four"


def test_an_unwritable_place_is_refused_before_any_work(tmp_path, monkeypatch):
    locked: set[str] = set()
    refuse_creation_in(monkeypatch, locked)
    parent = tmp_path / "locked"
    parent.mkdir()
    locked.add(str(parent))
    with pytest.raises(PermissionError, match="locked is not a folder you can write in; give another --out"):
        check_replaceable(parent / "a" / "b", ("marker",), "a test artifact")
    # an existing (empty, or earlier) --out in a folder one cannot write: the new one is made beside it
    (parent / "out").mkdir()
    with pytest.raises(PermissionError, match="locked is not a folder you can write in"):
        check_replaceable(parent / "out", ("marker",), "a test artifact")
    _write(tmp_path / "art", "one")  # an earlier artifact that cannot itself be moved aside
    locked.add(str(tmp_path / "art"))
    with pytest.raises(PermissionError, match="art is not a folder you can write in"):
        _write(tmp_path / "art", "two")
    with pytest.raises(PermissionError, match="set RANKLAB_CACHE to a folder you can write"):
        check_replaceable(tmp_path / "art", ("marker",), "a cached thing", cache=True)
    assert (tmp_path / "art" / "marker").read_text() == "one"
    assert check_replaceable(tmp_path / "free" / "b", ("marker",), "a test artifact") == tmp_path / "free" / "b"
    assert not [p for p in tmp_path.rglob(".ranklab-probe-*")]  # the probes leave nothing behind


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_a_place_where_nothing_can_be_created_is_refused_even_for_root():
    # os.access says yes to root on /proc; the write then failed only after the whole run
    with pytest.raises(PermissionError, match="cannot write a test artifact to /proc/foo: /proc is not a folder you "
                                              "can write in"):
        check_replaceable("/proc/foo", ("marker",), "a test artifact")


def test_a_failed_write_keeps_the_previous_artifact(tmp_path):
    _write(tmp_path / "art", "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(tmp_path / "art", ("marker",), "a test artifact") as tmp:
            (tmp / "marker").write_text("half")
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="marker not all written"):
        with atomic_folder(tmp_path / "art", ("marker",), "a test artifact") as tmp:
            (tmp / "other").write_text("no marker")
    assert (tmp_path / "art" / "marker").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_the_previous_artifact_survives_a_failure_while_replacing_it(tmp_path, monkeypatch):
    from pathlib import Path

    _write(tmp_path / "art", "old")
    real = Path.rename

    def flaky(self, target):  # the new folder cannot be moved into place (a full disk, a crash)
        if self.name.startswith(".art.tmp-"):
            assert not (tmp_path / "art").exists() and any(tmp_path.glob(".art.old-*/art/marker"))
            raise OSError("disk full")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", flaky)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path / "art", "new")
    assert (tmp_path / "art" / "marker").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]

    def taken(self, target):  # another writer puts a folder there between the two renames
        if self.name.startswith(".art.tmp-"):
            (tmp_path / "art").mkdir()
            (tmp_path / "art" / "theirs.txt").write_text("another writer's")
            raise OSError("target exists")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", taken)
    with pytest.raises(OSError, match="target exists"):
        _write(tmp_path / "art", "new")
    kept = list(tmp_path.glob(".art.old-*/art/marker"))  # the earlier artifact is set aside, never deleted
    assert len(kept) == 1 and kept[0].read_text() == "old"
    assert (tmp_path / "art" / "theirs.txt").exists()


def test_json_markers_must_be_ranklab_artifacts(tmp_path):
    import json

    from analysis.atomic import holds

    user = tmp_path / "results"
    user.mkdir()
    (user / "table.csv").write_text("a,b\n1,2\n")
    (user / "meta.json").write_text(json.dumps({"author": "me"}))  # a user's meta.json: no "format"
    with pytest.raises(FileExistsError, match="does not hold a sensitivity grid"):
        check_replaceable(user, ("meta.json", "table.csv"), "a sensitivity grid")
    (user / "meta.json").write_text(json.dumps({"format": 1}))
    assert holds(user, ("meta.json", "table.csv")) and not holds(user, ("meta.json", "arrays.safetensors"))
    with pytest.raises(TypeError, match="sequence of file names"):
        holds(user, "meta.json")
