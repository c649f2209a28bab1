import pytest
import yaml

from mobilemoe.cli import main
from mobilemoe.scaling.profiles import BUILTIN_PROFILES, ProfileError, get_profile, list_profiles, load_profile

GOOD = dict(name="my-phone", memory_gb=6, memory_bandwidth_gbs=50.0, bandwidth_efficiency=0.5,
            compute_gflops={"fp16": 400, "int8": 1000}, compute_efficiency=0.5, decode_dtype="int8",
            prefill_dtype="int8", storage_bandwidth_gbs=2.0)


def test_shipped_profiles_load():
    profiles = list_profiles()
    assert {"galaxy-s25", "iphone-16-pro", "jetson-orin-nx", "epyc-2core"} <= set(profiles)
    for f in BUILTIN_PROFILES.glob("*.yaml"):
        p = load_profile(f)
        assert p.bandwidth > 0 and p.compute(p.decode_dtype) > 0


def _write(tmp_path, data, name="p.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("change,field", [
    ({"memory_bandwidth_gbs": -3}, "memory_bandwidth_gbs"),
    ({"memory_bandwidth_gbs": "fast"}, "memory_bandwidth_gbs"),
    ({"decode_dtype": "int4"}, "decode_dtype"),
    ({"compute_gflops": {"fp16": 0}}, "compute_gflops.fp16"),
    ({"bandwidth_efficiency": 1.5}, "bandwidth_efficiency"),
    ({"bandwith_gbs": 3}, "bandwith_gbs"),
    ({"storage_bandwidth_gbs": None}, "storage_bandwidth_gbs"),
])
def test_bad_profile_field_is_named(tmp_path, change, field):
    data = dict(GOOD, **change)
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError, match=f"field '{field}'"):
        load_profile(path)


def test_missing_field_is_named(tmp_path):
    data = dict(GOOD)
    del data["prefill_dtype"]
    with pytest.raises(ProfileError, match="field 'prefill_dtype': missing"):
        load_profile(_write(tmp_path, data))


def test_profiles_dir_adds_user_profiles_and_roofline(tmp_path, capsys):
    _write(tmp_path, GOOD, "mine.yaml")
    p = get_profile("my-phone", str(tmp_path))
    t, bound = p.decode_seconds(bytes_per_token=25e6, flops_per_token=1e6)
    assert bound == "memory" and t == pytest.approx(25e6 / (50e9 * 0.5))
    t, bound = p.prefill_seconds(weight_bytes=1e6, flops=1e12)
    assert bound == "compute" and t == pytest.approx(1e12 / (1000e9 * 0.5))
    assert main(["plan", "--list-devices", "--profiles-dir", str(tmp_path)]) == 0
    assert "my-phone" in capsys.readouterr().out
    with pytest.raises(ProfileError, match="unknown device 'nope'"):
        get_profile("nope", str(tmp_path))
