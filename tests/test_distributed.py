"""The distributed environment of a job from SLURM's variables (what srun gives each task)."""
from po_experiments.distributed import _first_host, env_from_slurm

TASK = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_JOB_ID": "123456"}


def test_a_task_of_a_multi_task_step_gets_torch_distributed_variables():
    env = env_from_slurm(TASK)
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "8" and env["LOCAL_RANK"] == "1"
    assert env["LOCAL_WORLD_SIZE"] == "4"
    assert env["MASTER_ADDR"] == "gpu003"  # the step's first node (scontrol, or parsed when it is absent)
    assert env["MASTER_PORT"] == str(20000 + 123456 % 20000)  # one port per job: jobs can share a node


def test_single_task_jobs_and_launcher_set_variables_are_left_alone():
    assert env_from_slurm({**TASK, "SLURM_NTASKS": "1"}) == {}
    assert env_from_slurm({**TASK, "RANK": "0"}) == {}  # torchrun inside an allocation already set them
    assert env_from_slurm({}) == {}


def test_master_address_and_port_given_by_the_user_win():
    env = env_from_slurm({**TASK, "MASTER_ADDR": "head", "MASTER_PORT": "29400"})
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("head", "29400")


def test_first_host_of_node_lists():
    assert _first_host("node7") == "node7"
    assert _first_host("gpu[003-005,007],cpu1") == "gpu003"
