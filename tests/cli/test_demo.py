"""`imagetasks demo` on a fresh directory, as `make demo` runs it."""

from __future__ import annotations

from pathlib import Path

from .helpers import clean_env, run_cli


def test_demo_stores_an_image_and_reports_it(tmp_path: Path) -> None:
    """With no configuration, the demo exits 0 and prints the file, sha256, dimensions and
    the signed webhook."""
    result = run_cli("demo", env=clean_env(), cwd=tmp_path, timeout=60)
    assert result.code == 0, result.stderr
    stored = Path(result.field("file"))
    assert stored.is_file()
    assert stored.is_relative_to(tmp_path / "var" / "images")
    assert len(result.field("sha256").split()[0]) == 64
    assert result.field("dimensions") == "1024x1024"  # the requested (default) size
    assert (tmp_path / ".env").is_file()
    # It ends with the signed image.stored its receiver got, verified (else it exits non-zero).
    assert "The built-in receiver got this signed webhook:" in result.stderr
    assert "webhook-id: evt_" in result.stderr
    assert "webhook-signature: v1," in result.stderr
    assert '"type":"image.stored"' in result.stderr.replace("\n", "")
    assert "signature: verified with the token's default secret whsec_" in result.stderr
