"""`build_app` turns a ServeConfig into Serve deployments: replica resources, autoscaling or a fixed replica
count, room for a batch decoding while the next one fills, one deployment per merged model; bad dirs refused
before anything starts."""

import pytest

from honed.serve.app import build_app


def deployments(app) -> dict:
    router = app._bound_deployment
    server, merged = router.init_args[0], router.init_args[1]
    found = {router.name: router, server._bound_deployment.name: server._bound_deployment}
    for bound in merged.values():
        found[bound._bound_deployment.name] = bound._bound_deployment
    return found


def test_autoscaling_resources_and_batch_room_reach_the_model_deployment(tiny_model):
    app = build_app({"model": {"name_or_path": tiny_model}, "num_cpus": 2, "num_gpus": 1, "max_batch_size": 4,
                     "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4}})
    server = deployments(app)["ModelServer"]
    scaling = server._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 3, 4)
    assert server.ray_actor_options["num_cpus"] == 2 and server.ray_actor_options["num_gpus"] == 1
    assert server.max_ongoing_requests == 8


def test_fixed_replicas_and_a_deployment_per_merged_model(tiny_model):
    app = build_app({"model": {"name_or_path": tiny_model}, "num_replicas": 2, "merged": {"m1": tiny_model}})
    found = deployments(app)
    assert set(found) == {"OpenAIRouter", "ModelServer", "Merged-m1"}
    assert found["ModelServer"].num_replicas == 2 and found["Merged-m1"].num_replicas == 2
    assert found["Merged-m1"].init_args[1] == str(__import__("pathlib").Path(tiny_model).resolve())


@pytest.mark.parametrize("args, message", [
    ({"merged": {"m1": "/nonexistent/model"}}, "not a model directory"),
    ({"adapters": {"a": "/nonexistent/adapter"}}, "not an adapter directory"),
    ({"registry": "/nonexistent/registry"}, "is not a directory"),
])
def test_missing_dirs_are_refused_when_building(args, message):
    with pytest.raises(FileNotFoundError, match=message):
        build_app(args)


@pytest.mark.parametrize("args, message", [
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "exceeds max_replicas"),
    ({"merged": {"base": "/x"}}, "collides with base_name"),
    ({"adapters": {"Bad/Name": "/x"}}, "is not allowed"),
    ({"max_batch_size": 0}, "greater than 0"),
])
def test_bad_serve_configs_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        build_app(args)
