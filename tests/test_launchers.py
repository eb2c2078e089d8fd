"""Real launchers: a single-node Slurm cluster started here (sbatch + preemption/requeue), mpiexec, torchrun."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.bootstrap import read_env

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
QUICK = ["data.tokens_per_step=4096", "train.progress=false"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_"))}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


# ---- bootstrap: every launcher's variables ----


def test_read_env_per_launcher():
    assert read_env({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}) \
        .launcher == "torchrun"  # fmt: skip
    s = read_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "7",
                  "SLURM_JOB_NODELIST": "gpu[03-04]", "PATH": ""})  # fmt: skip
    assert (s.rank, s.world, s.local_rank, s.launcher) == (3, 8, 1, "slurm")
    assert s.master_addr in ("gpu03", ["gpu", "03-04]"][0] + "03")
    o = read_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                  "MASTER_ADDR": "a"})  # fmt: skip
    assert (o.rank, o.world, o.launcher) == (1, 2, "openmpi")
    m = read_env({"PMI_RANK": "0", "PMI_SIZE": "1"})
    assert (m.rank, m.world, m.launcher) == (0, 1, "mpich")
    assert read_env({}).launcher == "single"


@pytest.mark.parametrize(
    "env",
    [{"RANK": "4", "WORLD_SIZE": "4"}, {"SLURM_PROCID": "0", "SLURM_NTASKS": "0"}, {"RANK": "x", "WORLD_SIZE": "2"}],
)
def test_inconsistent_env_is_a_clear_error(env):
    with pytest.raises(ValueError, match="inconsistent|not an integer"):
        read_env(env)


# ---- torchrun and mpiexec ----


def test_torchrun_two_nodes_with_the_documented_script(tmp_path):
    """slurm/torchrun_node.sh as documented, started twice here as two nodes of 2 ranks: torchrun's c10d
    rendezvous gives the 4 ranks distinct node ranks (its default static backend would not), the trainer reads
    2 nodes x 2 from the launch, and both finish the run."""
    from trainer.bootstrap import free_loopback_port

    env = _env(NNODES="2", NPROC="2", RDZV_ENDPOINT=f"127.0.0.1:{free_loopback_port()}", RUN_ID="two-nodes",
               SP_PYTHON=PY)  # fmt: skip
    args = ["bash", str(REPO / "slurm" / "torchrun_node.sh"), "train.steps=2", f"train.out_dir={tmp_path / 'run'}",
            "cluster.gpus_per_node=2", "cluster.nodes=2", *QUICK]  # fmt: skip
    nodes = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in nodes]
    for p, (_, err) in zip(nodes, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    text = "".join(o for o, _ in outs)
    assert "launcher torchrun, 4 ranks" in text and "2 node(s) x 2 GPUs" in text, text[-3000:]
    assert (tmp_path / "run" / "COMPLETE").exists()


@pytest.mark.slow  # a third launcher of the same trainer (torchrun and srun run in the fast suite)
def test_mpiexec_four_ranks(tmp_path):
    mpiexec = Path(PY).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("mpiexec not installed (pip install '.[mpi]')")
    cmd = [str(mpiexec), "-n", "4", PY, "-m", "cli.train", "train.steps=2", f"train.out_dir={tmp_path}", *QUICK]
    out = subprocess.run(cmd, cwd=tmp_path, env=_env(MASTER_PORT="29517"), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "launcher mpich, 4 ranks" in out.stdout


# ---- Slurm ----


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    script = REPO / "slurm" / "local_cluster.sh"
    inst = subprocess.run(["bash", str(script), "install"], capture_output=True, text=True, timeout=600)
    if inst.returncode == 3:
        pytest.skip(f"cannot install Slurm here: {inst.stderr.strip()}")
    assert inst.returncode == 0, inst.stderr
    d = tmp_path_factory.mktemp("slurm")
    up = subprocess.run(["bash", str(script), "start", str(d / "cluster")], capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr + up.stdout
    env = _env(SLURM_CONF=str(d / "cluster" / "slurm.conf"), SP_PYTHON=PY)
    yield env, d
    subprocess.run(["bash", str(script), "stop", str(d / "cluster")], env=env, capture_output=True, timeout=60)


CPU_NODE = ["--ntasks-per-node=4", "--gpus-per-node=0", "--cpus-per-task=1", "--signal=B:USR1@90"]  # over #SBATCH


def _sbatch(env, cwd, *args):
    """train.sbatch as written for GPU nodes, with sbatch's own options (which win over its #SBATCH lines) and the
    cpu profile for this machine's CPU node."""
    env = {"SP_CLUSTER": "cpu", "SP_SIGNAL_S": "90", **env}
    out = subprocess.run(["sbatch", f"--chdir={cwd}", *CPU_NODE, str(REPO / "slurm" / "train.sbatch"), *args],
                         env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return re.search(r"(\d+)", out.stdout).group(1)


def _state(env, job):
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"JobState=(\w+)", out)
    return m.group(1) if m else "UNKNOWN"


def _wait(env, job, want, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = _state(env, job)
        if st == want:
            return
        if st in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") and st != want:
            break
        time.sleep(1)
    pytest.fail(f"job {job} is {_state(env, job)}, wanted {want}")


def _wait_for_line(env, job, log, pattern, timeout):
    """Poll the job's log until a line matches (an observable event, not a guessed delay)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = log.read_text() if log.exists() else ""
        if re.search(pattern, text):
            return text
        if _state(env, job) in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(0.5)
    pytest.fail(f"job {job} ({_state(env, job)}): no line {pattern!r} in {log}:\n{text[-2000:]}")


def _wait_for_restart(env, job, log, timeout):
    """Wait for the requeued job's restart (its own log line). Slurm holds a requeued batch job (EligibleTime =
    requeue + 120 s, then the next scheduling pass, about 160 s here); releasing it earlier restarts it before
    its old job credential has expired, and slurmctld kills it ("Job credential revoked"). While the batch step
    is killed for the requeue, ``scontrol`` briefly shows FAILED: no state in this window is final, only the
    restart line."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if re.search(rf"job {job} restart 1 on", log.read_text()):
            return
        time.sleep(1)
    pytest.fail(f"job {job} ({_state(env, job)}) did not restart after its requeue:\n{log.read_text()[-2000:]}")


def _scalars(tb_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = set()
    for f in Path(tb_dir).glob("events.*"):
        acc = EventAccumulator(str(f))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            steps |= {e.step for e in acc.Scalars(tag)}
    return steps


def test_sbatch_train_job_completes(slurm):
    env, d = slurm
    job = _sbatch(env, d, "train.steps=3", "train.checkpoint_every=3", *QUICK)
    _wait(env, job, "COMPLETED", 180)
    run = d / "runs" / f"sp-train-{job}"
    assert (run / "COMPLETE").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000003"
    assert _scalars(run / "tb", "train/loss") == {0, 1, 2}
    log = (d / f"sp-train-{job}.out").read_text()
    assert "launcher slurm, 4 ranks" in log


@pytest.mark.slow  # Slurm holds a requeued job ~160 s
def test_sbatch_preemption_checkpoints_requeues_and_resumes(slurm):
    """Preempted at step k of 40 in a folder that holds a stale COMPLETE from an earlier finished run: the
    job must requeue and resume (not report "training complete"), and finish with its own COMPLETE."""
    env, d = slurm
    run = d / "runs" / "stale-complete"
    run.mkdir(parents=True)
    (run / "COMPLETE").write_text('{"step": 3, "target_steps": 3, "config_hash": "earlier-run"}\n')
    job = _sbatch({**env, "SP_RUN_DIR": str(run)}, d, "train.steps=40", "train.checkpoint_every=100", *QUICK)
    log = d / f"sp-train-{job}.out"
    _wait_for_line(env, job, log, r"\[sp-train\] step 3/40 loss", 180)  # training, a few steps in
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True, timeout=30)
    _wait_for_line(env, job, log, r"requeueing job", 180)
    _wait_for_restart(env, job, log, 400)
    _wait(env, job, "COMPLETED", 400)
    text = log.read_text()
    stopped = re.search(r"stop requested: checkpointed step (\d+)", text)
    assert stopped, text[-2000:]
    k = int(stopped.group(1))
    assert 0 < k < 40
    assert "resumed from" in text and f"(step {k})" in text
    assert "requeueing job" in text and "training complete" in text
    assert text.index("requeueing job") < text.index("training complete")  # the stale marker did not end it
    assert json.loads((run / "COMPLETE").read_text())["step"] == 40
    assert _scalars(run / "tb", "train/loss") == set(range(40))
