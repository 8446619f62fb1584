"""The run's tables and tasks: rows and schemas defined together, every task kind implemented."""

from __future__ import annotations

import pytest

from configs import schema
from configs.plan import TaskKind, build_plan
from transforms.tables import ALL_TABLE_NAMES, DEAD_LETTER, EXIT_STATS, PREDICTIONS
from transforms.tasks import TASKS, task_for


def test_a_row_must_have_exactly_its_tables_columns():
    row = DEAD_LETTER.row(run_id="r", id="a", uri="a.jpg", stage=0, category="not_found", error="file not found")
    assert list(row) == ["run_id", "id", "uri", "stage", "category", "error"]
    with pytest.raises(ValueError, match=r"'dead_letter' does not fit its schema: missing \['error'\], "
                                         r"unknown \['reason'\]"):
        DEAD_LETTER.row(run_id="r", id="a", uri="a.jpg", stage=0, category="not_found", reason="file not found")


def test_every_task_kind_has_a_task_whose_predictions_table_extends_the_image_one():
    assert set(TASKS) == set(TaskKind)
    for kind, task in TASKS.items():
        assert task.kind is kind
        assert task.tables[0] is task.predictions
        assert PREDICTIONS.schema.names == task.predictions.schema.names[:len(PREDICTIONS.schema.names)]
        assert {t.name for t in task.tables} <= set(ALL_TABLE_NAMES)
    assert {EXIT_STATS.name, DEAD_LETTER.name} <= set(ALL_TABLE_NAMES)


@pytest.mark.parametrize("profile, kind, views", [("lite_cascade", TaskKind.IMAGES, 1),
                                                  ("video_frames", TaskKind.VIDEO_FRAMES, 1),
                                                  ("video_clips", TaskKind.VIDEO_CLIPS, 30)])
def test_the_plan_chooses_the_task_once_and_prices_each_record_by_its_views(profile, kind, views):
    cfg = schema.load(profile)
    plan = build_plan(cfg)
    assert plan.task is kind and task_for(plan).kind is kind and plan.views == views
    assert [s.number for s in plan.stages] == list(range(1, len(cfg.stages) + 1))
    assert [s.is_last for s in plan.stages] == [False] * (len(cfg.stages) - 1) + [True]
    assert plan.stages[-1].threshold is None and plan.stages[0].threshold == cfg.stages[0].threshold
    assert plan.stages[0].gmacs == pytest.approx(views * {"lite0@224": 0.385}[plan.stages[0].key], rel=0.01)


@pytest.mark.parametrize("execution, step", [("staged", "Stage3"), ("fused", "Cascade")])
def test_a_stage_carries_its_resource_hints_into_the_job(execution, step):
    """staged: the hints of stage 3 on its own step only; fused: every stage's hints on the one step."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines import cascade, job
    from pipelines.folder import RunFolder

    cfg = schema.load("lite_cascade", [f"execution={execution}", "input=in.csv", "stages.2.resources.min_ram=16GB",
                                       "stages.2.resources.accelerator=type:nvidia-l4;count:1"])
    p = beam.Pipeline()
    plan = build_plan(cfg)
    # the task given: in.csv's header is not read
    cascade.build(job.Job(cfg, None, [], PipelineOptions(), p, plan, task_for(plan), RunFolder("out"), "", False, ()))
    proto = p.to_runner_api().components
    hints = {t.unique_name: dict(proto.environments[t.environment_id].resource_hints)
             for t in proto.transforms.values() if t.environment_id}  # a leaf step's hints are its environment's
    mine = [v for name, v in hints.items() if name.startswith(f"{step}/")]
    assert mine and all(v["beam:resources:min_ram_bytes:v1"] == b"16000000000" for v in mine)
    assert all(v["beam:resources:accelerator:v1"] == b"type:nvidia-l4;count:1" for v in mine)
    assert not any(v for name, v in hints.items() if name.startswith(("Stage1", "Stage2", "ReadInputs")))
