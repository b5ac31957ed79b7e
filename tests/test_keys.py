"""The key layout: golden strings, escaping of braces, one cluster slot per flow."""

import pytest
from redis.crc import key_slot

from dynamiq_redis_ckpt.errors import ConfigurationError
from dynamiq_redis_ckpt.keys import Keys, tag

K = Keys("app")


def test_golden_key_names():
    assert K.checkpoint("f1", "c1") == "app:cp:{f1}:c1"
    assert K.flow_index("f1") == "app:flow:{f1}"
    assert K.status_index("f1", "active") == "app:flow:{f1}:st:active"
    assert K.run_index("f1", "r1") == "app:flow:{f1}:run:r1"
    assert K.pack("f1", "ab12") == "app:pack:{f1}:ab12"
    assert K.locator("c1") == "app:id:{c1}"
    assert K.run_flows("r1") == "app:runflows:{r1}"


@pytest.mark.parametrize("flow", ["f", "a{b", "a}b", "{x}", "}{", "", "%7B", "%", "a:b", "ünï"])
def test_every_key_of_a_flow_shares_one_slot(flow):
    keys = [K.checkpoint(flow, "c{1}"), K.flow_index(flow), K.status_index(flow, "failed"),
            K.run_index(flow, "r}"), K.pack(flow, "p")]  # fmt: skip
    assert len({key_slot(k.encode()) for k in keys}) == 1


def test_escaping_is_injective_and_never_leaves_a_brace_inside():
    values = ["a{b", "a%7Bb", "a}b", "a%7Db", "", "%", "%25"]
    tags = [tag(v) for v in values]
    assert len(set(tags)) == len(values)
    for t in tags:
        assert t.count("{") == 1 and t.count("}") == 1 and t[0] == "{" and t[-1] == "}"


def test_flows_spread_over_slots():
    assert len({key_slot(K.flow_index(f"flow-{i}").encode()) for i in range(50)}) > 40


@pytest.mark.parametrize("prefix", ["", "a{b", "a}b"])
def test_prefix_with_braces_is_refused(prefix):
    with pytest.raises(ConfigurationError):
        Keys(prefix)


def test_scan_patterns_escape_glob_characters_and_match_only_this_namespace():
    patterns = Keys("a*b?[c]").namespace_patterns()
    assert patterns[0] == "a\\*b\\?\\[c\\]:cp:\\{*"
    import fnmatch

    keys = Keys("app")
    mine = [keys.checkpoint("f", "c"), keys.flow_index("f"), keys.status_index("f", "x"), keys.run_index("f", "r"),
            keys.pack("f", "p"), keys.locator("c"), keys.run_flows("r")]  # fmt: skip
    nested = Keys("app:tenant")
    theirs = [nested.checkpoint("f", "c"), nested.flow_index("f"), nested.locator("c"), "app:other"]
    plain = [p.replace("\\", "") for p in keys.namespace_patterns()]
    assert all(any(fnmatch.fnmatchcase(k, p) for p in plain) for k in mine)
    assert not any(fnmatch.fnmatchcase(k, p) for p in plain for k in theirs)


def test_every_script_call_touches_one_slot(fake_backend):
    """Run every operation and check each Lua script's keys share one Redis Cluster slot."""
    from dynamiq.checkpoints.types import CheckpointStatus as S

    from dynamiq_redis_ckpt.requests import Batch, Script
    from tests.test_contract import make

    driver = fake_backend._sync
    seen = []
    original = driver._once

    def spy(request):
        seen.append(request)
        return original(request)

    driver._once = spy
    b = fake_backend
    for flow in ("f{1}", "plain", ""):
        parent = None
        for i in range(4):
            cp = make(f"{flow}-{i}", flow, "r}", "w{", S.ACTIVE if i < 3 else S.COMPLETED, i, parent, text="t " * 200)
            b.save(cp)
            parent = cp.id
        b.save(cp.model_copy(update={"run_id": "other", "status": S.FAILED}))
        b.get_list_by_flow(flow)
        b.get_list_by_run("r}")
        b.cleanup_by_flow(flow, keep_count=1)
        b.delete(f"{flow}-3")
    b.clear()
    parts = [c for r in seen for c in (r.commands if isinstance(r, Batch) else [r])]
    scripts = [r for r in parts if isinstance(r, Script)]
    assert {r.name for r in scripts} >= {"save", "delete"}
    for request in scripts:
        assert len({key_slot(k.encode()) for k in request.keys}) == 1, request.name
    for command in parts:
        if not isinstance(command, Script) and command.args[0] in ("UNLINK", "DEL", "EXISTS"):
            assert len(command.args) == 2, "multi-key commands outside scripts would be CROSSSLOT on a cluster"
