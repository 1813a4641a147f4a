"""nulls-launch: rendered sbatch scripts, the SLURM -> torch.distributed mapping, and real jobs of the real
trainer (debug model, bundled SynthWiki data, 2 gloo ranks) on a local SLURM cluster that this module starts
(munged + slurmctld + slurmd as root, stopped by PID at the end). Without the SLURM/munge binaries or root,
the cluster tests skip and say why; `.ci/run` installs them (apt-get install slurm-wlm munge).
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nulls_dist.cli.launch import flatten_overrides, spec_from_config, split_forwarded
from nulls_dist.launch.local_cluster import LocalSlurmCluster, missing_requirements
from nulls_dist.launch.slurm import SlurmSpec, render_sbatch
from nulls_dist.launch.submitit_task import slurm_minutes, submitit_parameters
from nulls_dist.launch.rendezvous import hostnames, master_port, slurm_rendezvous, tasks_per_node

pytestmark = pytest.mark.slurm

BIN = Path(sys.executable).parent
LAUNCH = [str(BIN / "nulls-launch")]
# The debug model on bundled SynthWiki, 2 CPU ranks at ZeRO 1, small and quick; eval off.
TRAIN_ARGS = ["experiment=demo", "train.device=cpu", "deepspeed.micro_batch=2", "eval.num_batches=0",
              "logging.log_every=1", "optim.warmup_steps=1"]


def _launch(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*LAUNCH, *args], capture_output=True, text=True, env=env, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"nulls-launch {args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


# ---- rendering (no cluster needed) ---------------------------------------------------------------------------


def test_dry_run_renders_multi_node_script(tmp_path):
    run_dir = tmp_path / "run"
    out = _launch("launcher=slurm_8gpu", "launcher.nodes=16", "launcher.partition=gpu", "launcher.account=proj",
                  "launcher.qos=high", "launcher.constraint=h100", "launcher.mem=480G", "launcher.time=2-00:00:00",
                  "launcher.signal_warning_s=900", f"run_dir={run_dir}", "dry_run=true", "name=wiki",
                  "--", "experiment=demo", "optim.lr=0.0003", "train.max_steps=7").stdout
    directives = re.findall(r"^#SBATCH (\S+)$", out, flags=re.M)
    for expected in ("--job-name=wiki", "--nodes=16", "--ntasks-per-node=8", "--gpus-per-node=8",
                     "--cpus-per-task=12", "--mem=480G", "--time=2-00:00:00", "--partition=gpu", "--account=proj",
                     "--qos=high", "--constraint=h100", "--exclusive", "--signal=USR1@900", "--requeue",
                     "--open-mode=append", f"--output={run_dir}/logs/slurm-%j.out", f"--chdir={Path.cwd()}"):
        assert expected in directives, (expected, directives)
    assert not any(d.startswith("--signal=B:") for d in directives)  # the ranks, not the shell, get USR1
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert "--ntasks-per-node=8" in srun and f"--output={run_dir}/logs/rank%t-%j.out" in srun
    assert srun.endswith(f"-m nulls_dist.launch.task {BIN / 'nulls-train'} experiment=demo optim.lr=0.0003 "
                         f"train.max_steps=7 train.run_dir={run_dir}")
    # The rendezvous is the tasks' (launch/rendezvous.py), not a second copy in shell; a stale MASTER_* from the
    # submitting shell is dropped before the setup/env lines that may set their own.
    assert "unset MASTER_ADDR MASTER_PORT" in out
    assert "scontrol show hostnames" not in out and "MASTER_PORT=" not in out
    assert 'if [ "$rc" -eq 75 ]; then' in out and 'scontrol requeue "$SLURM_JOB_ID"' in out
    assert not run_dir.exists()  # a dry run creates nothing


def test_dry_run_multirun_renders_one_script_per_sweep_point(tmp_path):
    out = _launch("--multirun", "dry_run=true", f"run_dir={tmp_path}", f"runs_root={tmp_path}",
                  "+train.optim.lr=0.0001,0.0005",
                  "--", "experiment=demo").stdout
    scripts = out.split("#!/bin/bash")[1:]
    assert len(scripts) == 2
    for num, lr in enumerate(("0.0001", "0.0005")):
        srun = next(line for line in scripts[num].splitlines() if line.startswith("srun "))
        assert srun.endswith(f"experiment=demo optim.lr={lr} train.run_dir={tmp_path / str(num)}")


def test_overrides_are_forwarded_verbatim():
    own, forwarded = split_forwarded(["launcher=local_cpu", "--", "model=paper_wiki_1b", "train.run_dir=a b"])
    assert own == ["launcher=local_cpu"] and forwarded == ["model=paper_wiki_1b", "train.run_dir=a b"]
    assert flatten_overrides({"optim": {"lr": 3e-4, "betas": [0.9, 0.95]}, "experiment": "demo"}) == [
        "optim.lr=0.0003", "optim.betas=[0.9,0.95]", "experiment=demo"]
    script = render_sbatch(SlurmSpec(), "x", Path("/r"), ["train.run_dir=a b", "data.title='x y'"])
    assert "'train.run_dir=a b' 'data.title='\"'\"'x y'\"'\"''" in script  # shell-quoted, one argv each


def test_slurm_minutes_for_submitit():
    assert [slurm_minutes(t) for t in ("30", "05:30", "01:00:00", "00:00:30", "2-00:00:00", "1-12")] == [
        30, 6, 60, 1, 2880, 2160]


def test_spec_errors_name_the_field():
    with pytest.raises(ValueError, match="launcher.tasks_per_node"):
        SlurmSpec(gpus_per_node=8, tasks_per_node=4)
    with pytest.raises(ValueError, match="launcher.time"):
        SlurmSpec(time="two hours")
    with pytest.raises(ValueError, match="launcher.mem"):
        SlurmSpec(mem="lots")
    with pytest.raises(ValueError, match=r"launcher\.gpus"):
        spec_from_config({"gpus": 8})
    assert SlurmSpec(gpus_per_node=8).tasks_per_node == 8 and SlurmSpec().tasks_per_node == 1
    for field, value in (("time", "01:00:00\n"), ("mem", "480G\n"), ("cpus_per_task", "2"), ("exclusive", "no"),
                         ("sbatch_args", "--exclusive"), ("train_command", "nulls-train 'x")):
        with pytest.raises(ValueError, match=f"launcher.{field}"):
            SlurmSpec(**{field: value})


# ---- what user values may do to the script (security) -------------------------------------------------------

# Every field whose value lands in an `#SBATCH` line, and how to put `value` there.
SBATCH_FIELDS = {
    "launcher.partition": lambda v, d: render_sbatch(SlurmSpec(partition=v), "x", d, []),
    "launcher.account": lambda v, d: render_sbatch(SlurmSpec(account=v), "x", d, []),
    "launcher.qos": lambda v, d: render_sbatch(SlurmSpec(qos=v), "x", d, []),
    "launcher.constraint": lambda v, d: render_sbatch(SlurmSpec(constraint=v), "x", d, []),
    "launcher.sbatch_args[1]": lambda v, d: render_sbatch(SlurmSpec(sbatch_args=["--mail-type=END", f"--x={v}"]),
                                                          "x", d, []),
    "name": lambda v, d: render_sbatch(SlurmSpec(), v, d, []),
    "run_dir": lambda v, d: render_sbatch(SlurmSpec(), "x", d / v, []),
    "the working directory": lambda v, d: render_sbatch(SlurmSpec(), "x", d, [], workdir=d / v),
}


@pytest.mark.parametrize("char", ["\n", "\r", "\x0b", "\x00", "\x1b", "\u2028", " ", "\t", "#", "'", '"', "\\"],
                         ids=repr)
@pytest.mark.parametrize("field", sorted(SBATCH_FIELDS))
def test_sbatch_lines_refuse_what_sbatch_or_bash_would_misread(field, char, tmp_path):
    value = f"gpu{char}touch {tmp_path / 'pwned'}"
    with pytest.raises(ValueError) as err:
        SBATCH_FIELDS[field](value, tmp_path)
    message = str(err.value)
    assert message.startswith(field) and repr(value).strip("'\"") in message and "\n" not in message, message
    assert SBATCH_FIELDS[field]("gpu-h100_1", tmp_path).startswith("#!/bin/bash")  # a plain value passes


def test_sbatch_lines_refuse_hetjob_percent_and_bad_env_names(tmp_path):
    with pytest.raises(ValueError, match="launcher.partition.*heterogeneous"):
        SlurmSpec(partition="my-HetJob")
    with pytest.raises(ValueError, match="run_dir.*%"):
        render_sbatch(SlurmSpec(), "x", tmp_path / "r%j", [])
    with pytest.raises(ValueError, match="launcher.env.*'A;touch x'"):
        SlurmSpec(env={"A;touch x": "1"})
    with pytest.raises(ValueError, match="launcher.sbatch_args.0. must be an sbatch option"):
        SlurmSpec(sbatch_args=["hostname"])


def _run_with_recording_srun(script_path: Path, tmp_path: Path, **slurm: str) -> dict:
    """Run a rendered script as its batch job would, but with an `srun` that records its argv and the
    exported NOTE (and runs nothing) and an `scontrol` that fails loudly; returns what srun saw."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                                  "json.dump({'argv': sys.argv[1:], 'NOTE': os.environ.get('NOTE')}, "
                                  "open(os.environ['SRUN_RECORD'], 'w'))\n")
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho scontrol must not run >&2; exit 3\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    record = tmp_path / "srun.json"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SRUN_RECORD": str(record), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1", "MASTER_PORT": "1", **slurm}
    result = subprocess.run(["bash", str(script_path)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(record.read_text())


def test_hostile_paths_arguments_and_env_values_stay_data(tmp_path):
    """Spaces, quotes, `$(...)`, backticks and `;` in the run directory, a forwarded argument, an env value and
    an srun option: `bash -n` accepts the script, and running it (with a recording `srun`) creates none of the
    files the embedded commands would touch and hands every value over byte for byte."""
    mark = tmp_path / "pwned"
    run_dir = tmp_path / f"run;$(touch${{IFS}}{mark}_run_dir)`touch${{IFS}}{mark}_tick`"
    forwarded = f"""train.note=a b 'c' "d" $(touch {mark}_arg); touch {mark}_arg2 `touch {mark}_arg3` \\"""
    note = f"it's $(touch {mark}_env); \"x\""
    spec = SlurmSpec(env={"NOTE": note}, srun_args=[f"--comment=$(touch {mark}_srun) x"])
    script_path = tmp_path / "sbatch.sh"
    script_path.write_text(render_sbatch(spec, "x", run_dir, [forwarded, f"train.run_dir={run_dir}"],
                                         workdir=tmp_path))
    assert subprocess.run(["bash", "-n", str(script_path)], capture_output=True).returncode == 0

    seen = _run_with_recording_srun(script_path, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "sbatch.sh", "srun.json"]  # nothing touched
    assert seen["NOTE"] == note and f"--comment=$(touch {mark}_srun) x" in seen["argv"]
    assert f"--output={run_dir}/logs/rank%t-%j.out" in seen["argv"]
    assert seen["argv"][-2:] == [forwarded, f"train.run_dir={run_dir}"]


def test_node_range_and_a_requeue_onto_another_node_count(tmp_path):
    """`launcher.nodes=min-max` reaches `#SBATCH --nodes`; the step's size is read from SLURM when the script
    runs, so a requeue that comes back on 2 nodes instead of 3 starts 16 ranks, not 24."""
    out = _launch("launcher=slurm_8gpu", "launcher.nodes=2-4", f"run_dir={tmp_path / 'run'}", "dry_run=true").stdout
    assert "#SBATCH --nodes=2-4" in out.splitlines()
    assert "WORLD_SIZE" not in out and not re.search(r"--ntasks=\d", out)  # no rank count frozen into the script
    script_path = tmp_path / "sbatch.sh"
    script_path.write_text(out)
    for nodes, ntasks in (("3", "24"), ("2", "16")):
        argv = _run_with_recording_srun(script_path, tmp_path, SLURM_JOB_NUM_NODES=nodes)["argv"]
        assert argv[:3] == [f"--nodes={nodes}", f"--ntasks={ntasks}", "--ntasks-per-node=8"], argv
    assert SlurmSpec(nodes="4").nodes == 4 and SlurmSpec(nodes="1-1").nodes == "1-1"
    for bad in ("4-2", "0-2", "0", "2-", "two", 2.5, True):
        with pytest.raises(ValueError, match="launcher.nodes must be a node count"):
            SlurmSpec(nodes=bad)
    with pytest.raises(ValueError, match="launcher.nodes='2-4': a node range needs an sbatch submission"):
        submitit_parameters(SlurmSpec(nodes="2-4"), "x", str(tmp_path))
    assert submitit_parameters(SlurmSpec(nodes=2, time="1-12"), "x", "runs") == {
        "name": "x", "submitit_folder": "runs/.submitit/%j", "nodes": 2, "tasks_per_node": 1, "gpus_per_node": 0,
        "cpus_per_task": 1, "timeout_min": 2160, "partition": None, "account": None, "qos": None,
        "constraint": None, "signal_delay_s": 300}


def _one_line_error(result: subprocess.CompletedProcess, field: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nulls-launch: error: {field}="), result.stderr
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
    return lines[0]


def test_nulls_launch_reports_a_bad_sbatch_value_in_one_line(tmp_path):
    mark = tmp_path / "pwned"
    partition = f"launcher.partition='gpu\ntouch {mark}'"  # a quoted Hydra override may hold a newline
    dry = _launch("dry_run=true", f"run_dir={tmp_path / 'run'}", partition, "--", "experiment=demo", check=False)
    assert "contains a newline" in _one_line_error(dry, "launcher.partition") and dry.stdout == ""
    sweep = _launch("--multirun", "dry_run=true", f"runs_root={tmp_path}", "launcher.qos='a b'",
                    "+train.optim.lr=0.1,0.2", check=False)
    _one_line_error(sweep, "launcher.qos")
    # submitit's own sbatch script: stopped while Hydra builds the launcher, before anything is submitted
    submitit = _launch("--multirun", "hydra/launcher=nulls_submitit", f"runs_root={tmp_path}", partition,
                       "+train.optim.lr=0.1,0.2", check=False)
    _one_line_error(submitit, "launcher.partition")
    assert not mark.exists() and not list(tmp_path.glob("**/.submitit"))


def _task(procid: int, localid: int, nodeid: int, **extra: str) -> dict[str, str]:
    """The SLURM variables srun gives one task of a 3-node job with 8, 8 and 4 tasks (an uneven last node)."""
    env = {"SLURM_PROCID": str(procid), "SLURM_NTASKS": "20", "SLURM_LOCALID": str(localid),
           "SLURM_NODEID": str(nodeid), "SLURM_JOB_NUM_NODES": "3", "SLURM_TASKS_PER_NODE": "8(x2),4",
           "SLURM_STEP_TASKS_PER_NODE": "8(x2),4", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu[07-08],cpu3", "SLURM_STEP_NODELIST": "gpu[07-08],cpu3"}
    return {**env, **extra}


def test_slurm_rendezvous_maps_every_task_of_an_uneven_job():
    ranks = {}
    for nodeid, (first, count) in enumerate([(0, 8), (8, 8), (16, 4)]):
        for localid in range(count):
            rdv = slurm_rendezvous(_task(first + localid, localid, nodeid))
            assert (rdv.rank, rdv.local_rank, rdv.node_rank) == (first + localid, localid, nodeid)
            assert (rdv.world_size, rdv.local_world_size, rdv.num_nodes) == (20, count, 3)
            ranks[rdv.rank] = (rdv.master_addr, rdv.master_port)
    assert sorted(ranks) == list(range(20)) and set(ranks.values()) == {("gpu07", 23456)}  # one rendezvous
    assert slurm_rendezvous(_task(17, 1, 2)).torch_env() == {
        "RANK": "17", "WORLD_SIZE": "20", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "NODE_RANK": "2",
        "MASTER_ADDR": "gpu07", "MASTER_PORT": "23456"}
    assert tasks_per_node("8(x2),4") == [8, 8, 4] and hostnames("gpu[07-08],cpu3") == ["gpu07", "gpu08", "cpu3"]
    assert hostnames("rack[1-2]-n[01-02]") == ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]


def test_slurm_rendezvous_after_a_requeue_on_another_node_count():
    """A requeue keeps the job id: the same port, whatever nodes the job comes back on; the world size is the
    new allocation's, read when the task starts."""
    first = slurm_rendezvous(_task(9, 1, 1))
    again = slurm_rendezvous({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
                              "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_ID": "123456", "SLURM_RESTART_COUNT": "1",
                              "SLURM_JOB_NODELIST": "gpu[11-12]"})
    assert first.master_port == again.master_port == master_port(123456) == 23456
    assert (first.world_size, again.world_size, again.num_nodes, again.master_addr) == (20, 16, 2, "gpu11")
    assert master_port(123457) != master_port(123456)  # another job, another port


def test_slurm_rendezvous_exported_master_wins_and_errors_name_the_variable():
    rdv = slurm_rendezvous(_task(3, 3, 0, MASTER_ADDR="gpu07-ib", MASTER_PORT="29400"))
    assert (rdv.master_addr, rdv.master_port) == ("gpu07-ib", 29400)
    # without the step's own list: the job's, and without any per-node counts: the even split
    bare = {k: v for k, v in _task(3, 3, 0).items() if not k.startswith(("SLURM_STEP_", "SLURM_TASKS_PER_NODE"))}
    assert slurm_rendezvous({**bare, "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "16"}).local_world_size == 8
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        slurm_rendezvous({})
    with pytest.raises(ValueError, match="SLURM_NTASKS.*'two'"):
        slurm_rendezvous(_task(0, 0, 0, SLURM_NTASKS="two"))
    with pytest.raises(ValueError, match="SLURM_NODEID=3"):
        slurm_rendezvous(_task(0, 0, 3))
    with pytest.raises(ValueError, match="SLURM_JOB_ID"):
        slurm_rendezvous({k: v for k, v in _task(0, 0, 0).items() if k != "SLURM_JOB_ID"})


def test_submitit_torch_environment_agrees_except_where_we_say(monkeypatch):
    """What launch/rendezvous.py's docstring claims about submitit's TorchDistributedEnvironment, checked:
    the same ranks and master host, LOCAL_WORLD_SIZE = ntasks // nodes (wrong on an uneven last node), and its
    own port (stable per job id, but drawn from 20000-60000)."""
    from submitit.helpers import TorchDistributedEnvironment

    task = _task(17, 1, 2, SUBMITIT_EXECUTOR="slurm")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in task.items():
        monkeypatch.setenv(name, value)
    theirs, ours = TorchDistributedEnvironment(), slurm_rendezvous(task)
    assert (theirs.rank, theirs.world_size, theirs.local_rank, theirs.master_addr) == (
        ours.rank, ours.world_size, ours.local_rank, ours.master_addr)
    assert (theirs.local_world_size, ours.local_world_size) == (20 // 3, 4)
    assert theirs.master_port == TorchDistributedEnvironment().master_port != ours.master_port


# ---- a real local cluster ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def synthwiki_dir(tmp_path_factory) -> Path:
    """This module's own copy of the prepared SynthWiki shards: the default `data/synthwiki` under the working
    directory is shared with other runs, and a resume refuses shards that changed under it."""
    out = tmp_path_factory.mktemp("synthwiki")
    subprocess.run([str(BIN / "nulls-data"), "data=synthwiki", f"data.output_dir={out}"], check=True,
                   capture_output=True, timeout=600)
    return out


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = missing_requirements()
    if reason:
        pytest.skip(f"no local SLURM cluster: {reason}")
    cluster = LocalSlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


def _job_field(env: dict, job_id: int, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", str(job_id)], env=env, capture_output=True, text=True).stdout
    match = re.search(rf"\b{name}=(\S+)", out)
    return match.group(1) if match else ""


def _logs(run_dir: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted((run_dir / "logs").glob("*")))


def _wait(predicate, what: str, timeout_s: float, run_dir: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{_logs(run_dir)}")


def _wait_job_end(env: dict, job_id: int, run_dir: Path, timeout_s: float) -> None:
    """Wait until the job has ended and assert it COMPLETED with exit code 0 (logs in the message if not)."""
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    state = _wait(lambda: (s := _job_field(env, job_id, "JobState")) in ended and s, "the job to end", timeout_s,
                  run_dir)
    exit_code = _job_field(env, job_id, "ExitCode")
    assert (state, exit_code) == ("COMPLETED", "0:0"), f"job {job_id}: {state} {exit_code}\n{_logs(run_dir)}"


def _submit(cluster, run_dir: Path, data_dir: Path, *train_args: str, launch_args: tuple[str, ...] = ()) -> int:
    out = _launch(f"run_dir={run_dir}", *launch_args, "--", *TRAIN_ARGS, f"data.output_dir={data_dir}", *train_args,
                  env=cluster.env).stdout
    assert f"run directory {run_dir}" in out
    return int((run_dir / "job_id").read_text())


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    complete = path.read_text().rpartition("\n")[0]  # the trainer may be writing the last line right now
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def _steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in _metrics(run_dir) if "train/loss" in row]


def test_two_rank_job_checkpoints_on_signal_requeues_resumes_and_completes(slurm_cluster, synthwiki_dir, tmp_path):
    """One 2-rank CPU job through nulls-launch: SIGUSR1 (what `--signal=USR1@<s>` sends at the time limit)
    -> checkpoint -> exit 75 -> `scontrol requeue` -> restart 1 resumes from `latest` -> both ranks finish.
    (A single job covers "completes with both ranks", the requeue and a node range: each trainer start costs
    ~1 min here.)"""
    run_dir = tmp_path / "run"
    max_steps = 40
    env = slurm_cluster.env
    # `--nodes=1-2`: the one-node cluster gives 1; the ranks come from what SLURM gave, at each start
    job_id = _submit(slurm_cluster, run_dir, synthwiki_dir, f"train.max_steps={max_steps}",
                     "checkpoint.every_n_steps=1000", launch_args=("launcher.nodes=1-2",))
    _wait(lambda: len(_steps(run_dir)) >= 2, "training steps", 240, run_dir)
    subprocess.run(["scancel", "--signal=USR1", str(job_id)], env=env, check=True)  # the job's steps' tasks
    _wait(lambda: int(_job_field(env, job_id, "Restarts") or 0) >= 1, "the requeue", 120, run_dir)
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 2 <= stopped_at < max_steps
    wandb_id = (run_dir / "wandb_run_id").read_text().strip()
    _wait_job_end(env, job_id, run_dir, 300)

    batch_log = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert "checkpointed on signal; requeueing" in batch_log
    assert f"job {job_id} restart 1 nodes 1 " in batch_log  # SLURM_RESTART_COUNT in the requeued run
    for rank in (0, 1):  # both ranks ran in both attempts, under the rendezvous the batch script derived
        log = (run_dir / "logs" / f"rank{rank}-{job_id}.out").read_text()
        for restart in (0, 1):
            assert (f"[launch.task] rank {rank}/2 local {rank}/2 node 0/1 host {socket.gethostname()} "
                    f"master localhost:{master_port(job_id)} restart {restart}") in log
    rank0 = (run_dir / "logs" / f"rank0-{job_id}.out").read_text()
    assert f"checkpointed step {stopped_at}, exiting with code 75" in rank0
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at:08d}'} at step {stopped_at}" in rank0
    steps = _steps(run_dir)  # metrics.jsonl is appended across the restart: no step repeated or skipped
    assert steps == list(range(1, max_steps + 1)), steps
    tag_dir = run_dir / "checkpoints" / f"step_{max_steps:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == tag_dir.name
    assert (tag_dir / "rank_00001.json").is_file()  # rank 1's RNG state
    assert list(tag_dir.glob("*zero_pp_rank_1_*"))  # rank 1's ZeRO partition
    assert (run_dir / "wandb_run_id").read_text().strip() == wandb_id  # the same wandb run continues
    version = json.loads((run_dir / "code_version.json").read_text())
    assert len(version["commit"]) == 40 and isinstance(version["status"], list)
    assert OmegaConf.create((run_dir / "train_config.yaml").read_text()).train.max_steps == max_steps
    assert (run_dir / "sbatch.sh").read_text().startswith("#!/bin/bash")


def test_submitit_sweep_runs_one_job_per_point(slurm_cluster, synthwiki_dir, tmp_path):
    """`--multirun hydra/launcher=nulls_submitit`: a job array, one single-rank nulls-train run per point."""
    result = _launch("--multirun", "hydra/launcher=nulls_submitit", f"runs_root={tmp_path}", "name=sweep",
                     "launcher.tasks_per_node=1", "+train.optim.lr=0.001,0.002", "--", *TRAIN_ARGS,
                     f"data.output_dir={synthwiki_dir}", "train.max_steps=2", "checkpoint.every_n_steps=2",
                     "logging.wandb_mode=disabled",
                     env=slurm_cluster.env)
    run_dirs = sorted(tmp_path.glob("sweep-*_*"))
    assert [d.name.rsplit("_", 1)[1] for d in run_dirs] == ["0", "1"], (run_dirs, result.stdout, result.stderr)
    for run_dir, lr in zip(run_dirs, (0.001, 0.002)):
        rows = _metrics(run_dir)
        assert [row["step"] for row in rows if "train/loss" in row] == [1, 2]
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
        assert OmegaConf.load(run_dir / "launch.yaml").train.optim.lr == lr
