"""roles/python_env/files/pack_wheelhouse.sh, the script setup.yml runs on the controller to send a wheelhouse to the
hosts as one archive: packs every package (wheels, and sdists a hand-made `pip download` leaves), packs again only
when they changed, refuses a directory with none naming the fix."""
import pathlib
import subprocess
import tarfile

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "roles" / "python_env" / "files" / "pack_wheelhouse.sh"


def pack(folder, archive):
    return subprocess.run(["sh", str(SCRIPT), str(folder), str(archive)], capture_output=True, text=True, timeout=60)


def members(archive):
    with tarfile.open(archive) as tar:
        return sorted(tar.getnames())


def test_packs_the_wheels_once_and_again_only_when_they_change(tmp_path):
    wheels, archive = tmp_path / "cpu", tmp_path / "cpu.tar"
    wheels.mkdir()
    (wheels / "a-1.0-py3-none-any.whl").write_bytes(b"a" * 1000)
    (wheels / "b-2.0-py3-none-any.whl").write_bytes(b"b" * 10)
    (wheels / ".complete").write_text("torch==2.13.0\n")          # the build record stays out of the archive
    (wheels / "hjson-3.1.0.tar.gz").write_bytes(b"sdist")           # an sdist is installable offline too
    first = pack(wheels, archive)
    assert first.returncode == 0 and first.stdout.strip() == "packed", first.stderr
    assert members(archive) == ["a-1.0-py3-none-any.whl", "b-2.0-py3-none-any.whl", "hjson-3.1.0.tar.gz"]
    with tarfile.open(archive) as tar:
        assert tar.extractfile("a-1.0-py3-none-any.whl").read() == b"a" * 1000

    again = pack(wheels, archive)
    assert again.returncode == 0 and again.stdout == "", again.stdout        # nothing changed: not written

    # a wheel copied in with an old mtime (cp -p) is still seen: the listing differs
    late = wheels / "c-3.0-py3-none-any.whl"
    late.write_bytes(b"c")
    subprocess.run(["touch", "-d", "2001-01-01", str(late)], check=True)
    assert pack(wheels, archive).stdout.strip() == "packed"
    assert "c-3.0-py3-none-any.whl" in members(archive)

    # a wheel rewritten in place (newer than the archive)
    (wheels / "b-2.0-py3-none-any.whl").write_bytes(b"B" * 20)
    subprocess.run(["touch", "-d", "2099-01-01", str(wheels / "b-2.0-py3-none-any.whl")], check=True)
    assert pack(wheels, archive).stdout.strip() == "packed"
    with tarfile.open(archive) as tar:
        assert tar.extractfile("b-2.0-py3-none-any.whl").read() == b"B" * 20
    assert not list(tmp_path.glob("cpu.tar.tmp.*"))


def test_a_directory_without_packages_fails_naming_the_fix(tmp_path):
    (tmp_path / "rocm").mkdir()
    result = pack(tmp_path / "rocm", tmp_path / "rocm.tar")
    assert result.returncode != 0
    assert "no packages in %s" % (tmp_path / "rocm") in result.stderr
    assert "python_env_wheelhouse_build: true" in result.stderr
    assert not (tmp_path / "rocm.tar").exists()
