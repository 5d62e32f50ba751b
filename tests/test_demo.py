"""`meal-ray demo` end to end with tiny models: stages, served teachers, both arms, seeds, table, exports, reuse."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

TINY = dict(subset=600, teacher_subset=1200, val_subset=500, teacher_epochs=1, init_epochs=1, arm_epochs=1, arm_lr=0.05,
            cutmix=True, batch=64, teachers=("test_resnet", "resnet10t"), student="test_efficientnet")


def test_demo_runs_every_stage_writes_the_table_and_reuses_finished_stages(tmp_path, ray_cluster):
    """One seed (the mean and std over several seeds are test_core's test_demo_summary_...): teachers, student init,
    control, MEAL V2 served and from the soft-label cache, the table, plots, exports, MLflow runs; then a rerun that
    trains nothing."""
    from mlflow.tracking import MlflowClient

    from meal_ray.demo import run_demo
    from meal_ray.evaluation import evaluate_export

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lines: list = []
    results = run_demo(str(tmp_path / "demo"), seeds=[0], tracking_uri=uri, log=lines.append, preset=TINY,
                       cache_passes=1)
    out = tmp_path / "demo"

    saved = json.loads((out / "results.json").read_text())
    assert saved["seeds"] == [0] and len(saved["runs"]) == 1
    models = [r["model"] for r in saved["summary"]]
    assert models == ["test_resnet", "resnet10t", "teacher ensemble", "student init", "control (hard labels)",
                      "MEAL V2 (ensemble soft labels)", "MEAL V2 (soft-label cache)"]
    for i, row in enumerate(saved["summary"]):  # each summary row is the mean of the per-seed rows
        per_seed = [run["rows"][i]["top1"] for run in saved["runs"]]
        assert row["top1"]["per_seed"] == per_seed and row["top1"]["mean"] == pytest.approx(per_seed[0])
    gains = [run["rows"][-2]["top1"] - run["rows"][-3]["top1"] for run in saved["runs"]]
    assert saved["gain_over_control"]["per_seed"] == pytest.approx(gains)
    # the cache arm: relabelled once per seed with the same teachers, distilled with no teacher asked
    cache_minus_served = [run["rows"][-1]["top1"] - run["rows"][-2]["top1"] for run in saved["runs"]]
    assert saved["cache_vs_served"]["per_seed"] == pytest.approx(cache_minus_served)
    cached_cfg = json.loads((out / "meal-v2-cache-seed0" / "run.json").read_text())["config"]
    assert cached_cfg["teachers"]["source"] == "cache" and cached_cfg["teachers"]["cache"] == str(out / "cache-seed0")
    assert json.loads((out / "cache-seed0" / "manifest.json").read_text())["spec"]["passes"] == 1
    ens = saved["runs"][0]["rows"][2]
    assert ens["gap_to_ensemble"] == 0 and ens["params"] == sum(r["params"] for r in saved["runs"][0]["rows"][:2])
    assert set(saved["runs"][0]["per_class"]["MEAL V2 (ensemble soft labels)"]) >= {"Shirt", "Trouser", "Bag"}

    # teachers pretrain on their own (larger) subset; the student's init and both arms share the student subset
    def stage_config(stage):
        return json.loads((out / stage / "run.json").read_text())["config"]

    teacher_subsets = [stage_config(s)["data"]["train_subset"] for s in ("teacher-test_resnet", "teacher-resnet10t")]
    assert teacher_subsets == [1200, 1200]
    assert {stage_config(f"{s}-seed0")["data"]["train_subset"] for s in ("student-init", "control", "meal-v2")} \
        == {600}
    # the preset's CutMix reaches both arms (the MEAL V2 arm's mixed images go through the served teachers)
    cutmix = [stage_config(f"{s}-seed0")["optim"]["cutmix"] for s in ("student-init", "control", "meal-v2")]
    assert cutmix == [False, True, True]

    # the exports are seed 0's arms and re-evaluate to the reported top-1 on the whole test set
    meal_top1 = saved["runs"][0]["rows"][-2]["top1"]
    assert saved["exports"]["student"] == {"seed": 0, "top1": meal_top1}
    result, _ = evaluate_export(str(out / "student"))
    assert result.top1 == pytest.approx(meal_top1, abs=1e-9) and result.count == 10000
    for png in ("per_class_accuracy.png", "arms_test_top1.png", "training_curves_meal_v2.png"):
        assert (out / png).stat().st_size > 10_000
    table = (out / "results.md").read_text()
    assert "seed 0" in table and "MEAL V2 - control (top-1)" in table
    assert "MEAL V2 from the cache - MEAL V2 served (top-1)" in table
    demo_runs = MlflowClient(tracking_uri=uri).search_runs(
        [MlflowClient(tracking_uri=uri).get_experiment_by_name("meal-ray-demo").experiment_id],
        filter_string="tags.mlflow.runName = 'demo-custom-seeds0'")
    assert demo_runs and demo_runs[0].data.metrics["gain_over_control_mean"] == pytest.approx(
        results["gain_over_control"]["mean"])

    # what the user saw: each stage numbered against the whole demo, each stage's epoch lines from its worker
    # the relabel is a stage of its own (before the cache arm), its progress lines carrying the whole demo's ETA
    assert [line.split(":")[0] for line in lines if line.startswith("[demo] stage")] == [
        f"[demo] stage {i}/7" for i in range(1, 8)]
    assert any(line.startswith("[demo] stage 6/7: cache-seed0, relabel 1 passes") for line in lines)
    assert any(line.startswith("[relabel] shard") and "| demo: stage 6/7, ETA" in line for line in lines)
    assert sum(line.startswith("[meal-ray] epoch 1/1 | loss") for line in lines) == 6
    # the demo's run page, and (a local store) the `mlflow ui` command that serves it
    link = [line for line in lines if line.startswith("[demo] MLflow: ")]
    assert len(link) == 1 and link[0].startswith("[demo] MLflow: http://127.0.0.1:5000/#/experiments/")
    assert f"(after `mlflow ui --backend-store-uri {uri}`)" in link[0]

    # every export's test-set figures are kept beside it (and the ensemble's in the demo directory)
    from meal_ray.demo.report import EVALUATION

    evaluations = sorted(out.glob(f"*/{EVALUATION}")) + [out / f"ensemble-{EVALUATION}"]
    assert len(evaluations) == 2 + 4 + 1  # the teachers; init, control, both MEAL V2 arms; the ensemble
    stamps = {p: p.stat().st_mtime_ns for p in evaluations}

    # a second run finds every stage finished and trains nothing, nor evaluates anything again
    again: list = []
    run_demo(str(out), seeds=[0], tracking_uri=uri, log=again.append, preset=TINY, cache_passes=1)
    assert sum("reusing finished stage" in line for line in again) == 2 + 4
    assert [line.split(":")[0] for line in again if line.startswith("[demo] stage")] == [
        f"[demo] stage {i}/6" for i in range(1, 7)]  # a finished cache arm plans no relabel
    assert {p: p.stat().st_mtime_ns for p in evaluations} == stamps
    assert json.loads((out / "results.json").read_text())["runs"][0]["rows"] == saved["runs"][0]["rows"]
    assert not any(line.startswith("[relabel]") for line in again)  # a finished cache arm reads no cache
    assert not any("for 1 epochs" in line for line in again)

    # MEAL V2 from the cache alone (an ablation row's cheap form): no teachers served, nothing trained again, its own
    # report comparing the cache arm with the control
    alone: list = []
    cache_only = run_demo(str(out), seeds=[0], tracking_uri=uri, log=alone.append, preset=TINY, cache_passes=1,
                          served_arm=False)
    assert not any("starting the teacher ensemble" in line for line in alone)
    assert sum("reusing finished stage" in line for line in alone) == 2 + 3
    rows = {r["model"]: r["top1"] for r in cache_only["runs"][0]["rows"]}
    assert "MEAL V2 (ensemble soft labels)" not in rows and cache_only["served_arm"] is False
    assert cache_only["gain_over_control"]["per_seed"] == [
        rows["MEAL V2 (soft-label cache)"] - rows["control (hard labels)"]]
    assert rows["MEAL V2 (soft-label cache)"] == {r["model"]: r["top1"] for r in results["runs"][0]["rows"]}[
        "MEAL V2 (soft-label cache)"]  # the same stage, evaluated again
    assert json.loads((out / "ablation-cache-only" / "results.json").read_text())["served_arm"] is False
    assert "MEAL V2 from the cache - control (top-1)" in (out / "ablation-cache-only" / "results.md").read_text()
    assert (out / "ablation-cache-only" / "arms_test_top1.png").is_file()
    # an ablation of the loss uses the default arm's cache (same crops, same teachers), here one an older meal-ray
    # wrote (schema v1), which the demo relabels in place: its own derived data
    manifest = out / "cache-seed0" / "manifest.json"
    manifest.write_text(json.dumps(dict(json.loads(manifest.read_text()), schema_version=1)))
    ablation: list = []
    run_demo(str(out), seeds=[0], tracking_uri=uri, log=ablation.append, preset=TINY, cache_passes=1,
             served_arm=False, no_discriminator=True)
    assert sum("cache of schema v1" in line for line in ablation) == 1
    relabelled = [line for line in ablation if "(0 already done)" in line]
    assert len(relabelled) == 1 and str(out / "cache-seed0") in relabelled[0]
    assert json.loads(manifest.read_text())["schema_version"] == 2
    no_disc = json.loads((out / "ablation-no-disc-cache-only" / "results.json").read_text())
    assert no_disc["ablation"]["no_discriminator"] is True

    # the ablation table: each row paired by seed with the default MEAL V2 row of its arm, into files and MLflow
    from mlflow.tracking import MlflowClient

    from meal_ray.demo.ablations import write_ablations

    def top1(res, model):
        return {r["model"]: r["top1"] for r in res["runs"][0]["rows"]}[model]

    table = write_ablations(out, uri, log=lambda s: None)
    rows = {(r["row"], r["kind"]): r for r in table["rows"]}
    assert set(rows) == {("MEAL V2 (served)", "served"), ("MEAL V2 (cache)", "cache"),
                         ("control (hard labels)", "served"), ("control (hard labels)", "cache"),
                         ("no discriminator", "cache")}
    cached = "MEAL V2 (soft-label cache)"
    row = rows["no discriminator", "cache"]
    assert row["vs_meal_v2"]["per_seed"] == [top1(no_disc, cached) - top1(results, cached)]
    assert row["verdict"] == "one seed: no verdict" and row["report"] == "ablation-no-disc-cache-only"
    assert rows["control (hard labels)", "served"]["vs_meal_v2"]["per_seed"] == [
        top1(results, "control (hard labels)") - top1(results, "MEAL V2 (ensemble soft labels)")]
    assert "no discriminator" not in {m["label"] for m in table["not_run"]} and len(table["not_run"]) == 8
    text = (out / "ablations.md").read_text()
    assert "| no discriminator | cache | `--no-discriminator` |" in text
    assert "`meal-ray demo --weight-decay 1e-4`" in text
    assert json.loads((out / "ablations.json").read_text())["rows"] == json.loads(json.dumps(table["rows"]))
    assert (out / "ablations.png").stat().st_size > 0
    client = MlflowClient(uri)
    run = client.get_run(table["mlflow_run_id"])
    assert run.data.metrics["vs_meal_v2/cache/no_discriminator"] == pytest.approx(row["vs_meal_v2"]["mean"])
    assert set(run.data.metrics) == {"vs_meal_v2/served/control_hard_labels", "vs_meal_v2/cache/control_hard_labels",
                                     "vs_meal_v2/cache/no_discriminator"}
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"ablations.md", "ablations.json",
                                                                        "ablations.png"}
    assert write_ablations(out, uri, log=lambda s: None)["mlflow_run_id"] == run.info.run_id  # reopened, not a new one


def test_ablation_verdicts_need_the_seed_spread_and_say_which_way():
    from meal_ray.demo.ablations import _paired, verdict

    reference = {0: 88.0, 1: 89.0, 2: 88.5}
    lower = _paired({0: 87.0, 1: 88.2, 2: 87.4}, reference)
    assert lower["per_seed"] == pytest.approx([-1.0, -0.8, -1.1])
    assert lower["seed_spread"] == pytest.approx(0.6110, abs=1e-4)  # the row's std (the reference's is 0.5)
    assert verdict(lower, -1) == "holds" and verdict(lower, +1) == "opposite" and verdict(lower, 0) == "lower"
    assert verdict(_paired({0: 88.3, 1: 88.9, 2: 88.4}, reference), -1) == "within noise"
    assert verdict(_paired({0: 87.0}, reference), -1) == "one seed: no verdict"
    assert _paired({5: 87.0}, reference) is None  # no seed in common: nothing to compare


def test_test_set_figures_are_computed_once_per_export_content(tmp_path):
    from meal_ray.demo.report import remembered

    calls: list = []

    def compute():
        calls.append(1)
        return {"top1": 88.5, "bins": (1, 2)}

    where = tmp_path / "evaluation.json"
    first = remembered(where, {"model.safetensors": "a"}, compute)
    assert first == {"top1": 88.5, "bins": [1, 2]}  # as JSON gives it back, the first time too
    assert remembered(where, {"model.safetensors": "a"}, compute) == first and len(calls) == 1
    assert remembered(where, {"model.safetensors": "b"}, compute) == first and len(calls) == 2  # other weights
    where.write_text("{cut")
    assert remembered(where, {"model.safetensors": "b"}, compute) == first and len(calls) == 3  # unreadable: again


def test_a_patient_run_is_listed_beside_the_ablation_table_never_paired_with_its_rows(tmp_path):
    """`meal-ray demo --arm-epochs N` reports into ablation-e<N>...; the ablation table keeps one training length
    (the default report's) and names the other length's report with its own gain over its own control."""
    from meal_ray.demo.ablations import collect, format_ablations
    from meal_ray.demo.report import CACHED, CONTROL, gain_over_control

    def report(folder, epochs, meal, control, **ablation):
        summary = [{"model": m, "top1": {"per_seed": v}} for m, v in ((CACHED, meal), (CONTROL, control))]
        path = tmp_path / folder / "results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"seeds": [0, 1, 2], "summary": summary, "ablation": ablation,
                                    "settings": {"arm_epochs": epochs},
                                    "gain_over_control": gain_over_control(summary, CACHED)}))

    report("ablation-cache-only", 40, [88.9, 88.5, 89.2], [87.9, 87.6, 88.0])
    report("ablation-hard0.5-cache-only", 40, [88.0, 87.8, 88.4], [87.9, 87.6, 88.0], hard_label_weight=0.5)
    report("ablation-e160-cache-only", 160, [90.1, 89.9, 90.3], [88.0, 87.9, 88.2])
    table = collect(tmp_path)
    assert table["arm_epochs"] == 40
    assert [r["row"] for r in table["rows"]] == ["MEAL V2 (cache)", "control (hard labels)", "hard-label weight 0.5"]
    assert table["rows"][0]["top1_per_seed"] == {0: 88.9, 1: 88.5, 2: 89.2}  # the 40-epoch run is the reference
    (patient,) = table["other_lengths"]
    assert patient["report"] == "ablation-e160-cache-only" and patient["arm_epochs"] == 160
    assert patient["gain_over_control"]["per_seed"] == pytest.approx([2.1, 2.0, 2.1])
    assert ("Not in this table (40 epochs per arm): ablation-e160-cache-only, 160 epochs per arm, seeds 0, 1, 2: "
            "MEAL V2 - control +2.07 ± 0.06 (its results.md).") in format_ablations(table)


def test_demo_arm_epochs_tag_the_arms_and_give_other_cache_lengths_their_own_folder(tmp_path):
    from meal_ray.demo import run_demo
    from meal_ray.demo.stages import _length_tags
    from meal_ray.errors import ConfigError

    assert _length_tags(40, None, 40) == ("", "") and _length_tags(40, 40, 0) == ("", "")  # the default demo's names
    assert _length_tags(40, 160, 160) == ("-e160", "-p160")  # patient: its own arms, its own 160-pass cache
    assert _length_tags(40, None, 8) == ("", "-p8")  # a shorter cache never lands in the 40-pass folder

    with pytest.raises(ConfigError, match=r"--arm-epochs=0 must be >= 1 \(default: the preset's 1\)"):
        run_demo(str(tmp_path / "demo"), preset=TINY, arm_epochs=0)
    assert not (tmp_path / "demo").exists()


def test_a_finished_stage_is_not_reused_when_its_weights_files_changed(tmp_path):
    """A stage records the sha256 of the weights it started from; the same config over a teacher (or init) trained
    again, at the same path with other weights, runs the stage again instead of reusing stale results."""
    import torch
    from conftest import FMNIST_DATA_CONFIG

    from meal_ray.config import load_config
    from meal_ray.demo.stages import _reusable
    from meal_ray.models import create_model, export_model
    from meal_ray.train.driver import input_digests

    def teacher(seed):
        torch.manual_seed(seed)
        export_model(create_model("test_resnet", num_classes=10, in_chans=1), tmp_path / "teacher", FMNIST_DATA_CONFIG)

    teacher(0)
    cfg = load_config(data=dict(name="meal", mode="distill", data=dict(dataset="fashion-mnist"),
                                student=dict(model="test_efficientnet", num_classes=10),
                                teachers=dict(source="served", models=[{"model": "test_resnet",
                                                                        "weights": str(tmp_path / "teacher")}]),
                                run=dict(output=str(tmp_path / "stage"))))
    out = cfg.output_dir
    export_model(create_model("test_efficientnet", num_classes=10, in_chans=1), out / "student", FMNIST_DATA_CONFIG)
    (out / "metrics.json").write_text(json.dumps({"top1": 50.0}))
    record = {"name": cfg.name, "config": cfg.to_dict(), "inputs": input_digests(cfg)}
    (out / "run.json").write_text(json.dumps(record))
    assert list(record["inputs"]) == ["teachers.models.0.weights"] and _reusable(cfg)
    teacher(1)  # trained again: same path, other weights
    assert not _reusable(cfg)
    (out / "run.json").write_text(json.dumps(dict(record, inputs=input_digests(cfg))))
    assert _reusable(cfg)
    record.pop("inputs")  # a stage finished before run.json recorded its inputs: reused as before
    (out / "run.json").write_text(json.dumps(record))
    assert _reusable(cfg)

    # the whole demo directory moved (or copied elsewhere): its stages name their inputs under the old place
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("teacher", "stage"):
        (tmp_path / name).rename(moved / name)
    at_new_place = cfg.to_dict()
    at_new_place["teachers"]["models"][0]["weights"] = str(moved / "teacher")
    at_new_place["run"]["output"] = str(moved / "stage")
    assert _reusable(load_config(data=at_new_place))
    at_new_place["optim"]["epochs"] += 1  # a real difference still runs the stage again
    assert not _reusable(load_config(data=at_new_place))


def test_demo_teachers_tag_only_the_meal_v2_arms_and_their_cache_and_bad_names_are_refused(tmp_path):
    """`meal-ray demo --teachers a,b,c`: the preset's teachers keep their stages, the MEAL V2 arms (and, in
    _run_seeds, their cache) are tagged by the ensemble, the control and init are the default run's; a report of
    other teachers is a row of the ablation table, never its reference."""
    from meal_ray.demo import run_demo
    from meal_ray.demo.ablations import collect
    from meal_ray.demo.report import CACHED, CONTROL
    from meal_ray.demo.stages import _arm_tags, _check_teachers, _teacher_stage
    from meal_ray.errors import ConfigError

    flags = dict(no_discriminator=False, weight_decay=0.0, hard_label_weight=0.0, student_init="pretrained")
    assert _check_teachers(None, ("resnet18", "resnet10t")) is None
    assert _check_teachers(["resnet18", " resnet10t"], ("resnet18", "resnet10t")) is None  # the preset's own
    three = _check_teachers(["resnet18", "resnet10t", "regnety_004"], ("resnet18", "resnet10t"))
    assert _arm_tags(**flags, teachers=three) == ("", "-teachers-resnet18+resnet10t+regnety_004")
    # --teacher-epochs: the same architectures trained longer are another ensemble, alone or with --teachers
    assert _arm_tags(**flags, teacher_epochs=15) == ("", "-teachers-e15")
    assert _arm_tags(**flags, teachers=three, teacher_epochs=15) == ("", "-teachers-resnet18+resnet10t+regnety_004-e15")
    assert _teacher_stage("resnet18", None) == "teacher-resnet18" and _teacher_stage("resnet18", 15) == \
        "teacher-resnet18-e15"
    with pytest.raises(ConfigError, match=r"--teacher-epochs=0 must be >= 1"):
        run_demo(str(tmp_path / "demo"), preset=TINY, teacher_epochs=0)
    for bad, message in (([""], "needs at least one timm model name"),
                         (["resnet18", "resnet18"], "names resnet18 twice"),
                         (["resnet18", "resnet1O"], r"--teachers: unknown timm model 'resnet1O'"),
                         (["hf-hub:timm/resnet18.a1_in1k"], "not an architecture name")):
        with pytest.raises(ConfigError, match=message):
            run_demo(str(tmp_path / "demo"), preset=TINY, teachers=bad)
    assert not (tmp_path / "demo").exists()  # refused before anything was written or Ray started

    def report(folder, meal, **ablation):
        summary = [{"model": m, "top1": {"per_seed": v}} for m, v in ((CACHED, meal), (CONTROL, [87.9, 87.6]))]
        path = tmp_path / "d" / folder / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"seeds": [0, 1], "summary": summary, "ablation": ablation,
                                    "settings": {"arm_epochs": 40}}))

    report("ablation-teachers-resnet18+resnet10t+regnety_004-cache-only", [89.4, 89.0], teachers=three)
    report("ablation-teachers-e15-cache-only", [89.9, 89.5], teacher_epochs=15)
    report("ablation-cache-only", [88.9, 88.5])
    rows = {r["row"]: r for r in collect(tmp_path / "d")["rows"]}
    assert rows["MEAL V2 (cache)"]["top1_per_seed"] == {0: 88.9, 1: 88.5}
    assert rows["other teachers"]["vs_meal_v2"]["per_seed"] == pytest.approx([0.5, 0.5])
    assert rows["teachers trained longer"]["vs_meal_v2"]["per_seed"] == pytest.approx([1.0, 1.0])
    assert rows["teachers trained longer"]["verdict"] == "holds"
