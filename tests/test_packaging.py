"""Packaging: nulls_dist installs exactly one top-level import package, `nulls_dist`, so generic names such as
`kernels` (Hugging Face's package, installed beside ours by requirements-test.txt) can neither shadow a part of
nulls_dist nor be shadowed by it."""
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_hugging_face_kernels_and_ours_import_side_by_side(tmp_path):
    probe = ("import kernels, nulls_dist.kernels.sink_mlp as ours, nulls_dist.data_pipeline, nulls_dist.launch, "
             "nulls_dist.conf\n"
             "print(kernels.__file__); print(ours.__file__); print(hasattr(kernels, 'get_kernel'))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    theirs, ours, is_hf = out.stdout.split()
    assert "site-packages" in theirs and not Path(theirs).resolve().is_relative_to((REPO / "kernels").resolve())
    assert is_hf == "True"  # Hugging Face's API, not our folder
    assert Path(ours).resolve() == (REPO / "kernels" / "sink_mlp.py").resolve()


def test_the_wheel_holds_only_nulls_dist(tmp_path):
    """Build the real wheel, with Hugging Face `kernels` installed in the build environment (its setuptools hook
    `kernels.lockfile` would fail to import if the build could see this repository's `kernels/` folder as the
    top-level `kernels`): every module in it lives under `nulls_dist/` (plus the dist-info)."""
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("nulls_dist-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"nulls_dist", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, tops
    for inside in ("nulls_dist/kernels/sink_mlp_triton.py", "nulls_dist/data_pipeline/shards.py",
                   "nulls_dist/launch/slurm.py", "nulls_dist/conf/nulls_train.yaml", "nulls_dist/deploy/generate.py",
                   "nulls_dist/evaluation/metrics.py", "nulls_dist/audit/verify.py", "nulls_dist/formats/weights.py",
                   "nulls_dist/data_pipeline/bundled/synthwiki/probes.jsonl", "nulls_dist/cli/train.py"):
        assert inside in names, inside
