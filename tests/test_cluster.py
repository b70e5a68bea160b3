"""The cluster model: presets, specs, files, Ray, submeshes and logical meshes."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
from importlib import resources

import pytest
import torch

from hierarchical_ap.cluster import (
    CPU_CORE_PEAK_FLOPS,
    CPU_DTENSOR_DISPATCH_S,
    CPU_INTER_HOST_BANDWIDTH,
    CPU_KERNEL_OVERHEAD_S,
    ETHERNET_LATENCY_S,
    INFINIBAND_LATENCY_S,
    LOOPBACK_BANDWIDTH,
    LOOPBACK_LATENCY_S,
    NVLINK_LATENCY_S,
    AlphaBeta,
    Cluster,
    Collective,
    DeviceSpec,
    Link,
    LogicalMesh,
    MeshAxis,
    Submesh,
    cluster_from_ray_nodes,
    preset_names,
)
from hierarchical_ap.errors import ClusterSpecError

GIB = 2**30
EXAMPLE = "2x8xA100-80GB"


@contextlib.contextmanager
def raises_with(match: str):
    """ClusterSpecError whose message names the cause (`match`) and shows the valid example."""
    with pytest.raises(ClusterSpecError, match=match) as info:
        yield info
    assert EXAMPLE in str(info.value), str(info.value)


# ----------------------------------------------------------------------------------- presets

# name: memory GiB, bf16/fp16 TFLOP/s, fp32 TFLOP/s, HBM TB/s, NVLink GB/s, network GB/s per GPU
DATASHEET = {
    "V100-16GB": (16, 125, 15.7, 0.9, 150, 3.125 / 8),
    "A100-40GB": (40, 312, 19.5, 1.555, 300, 25),
    "A100-80GB": (80, 312, 19.5, 2.039, 300, 25),
    "H100-80GB": (80, 989, 67, 3.35, 450, 50),
    "H200-141GB": (141, 989, 67, 4.8, 450, 50),
    "B200-192GB": (192, 2250, 80, 8.0, 900, 50),
}


@pytest.mark.parametrize("name", sorted(DATASHEET))
def test_presets_match_datasheet(name):
    memory, half, fp32, hbm, nvlink, network = DATASHEET[name]
    device = DeviceSpec.preset(name)
    assert device.name == name
    assert device.memory_bytes == memory * GIB
    assert device.peak_flops(torch.bfloat16) == pytest.approx(half * 1e12)
    assert device.peak_flops(torch.float16) == pytest.approx(half * 1e12)
    assert device.peak_flops(torch.float32) == pytest.approx(fp32 * 1e12)
    assert device.hbm_bandwidth == pytest.approx(hbm * 1e12)
    cluster = Cluster.from_spec(f"2x8x{name}")
    assert cluster.intra_host_link == Link(nvlink * 1e9, NVLINK_LATENCY_S)
    assert cluster.inter_host_link.bandwidth == pytest.approx(network * 1e9)


def test_presets_cover_every_csv_row():
    text = (resources.files("hierarchical_ap") / "data" / "hardware.csv").read_text()
    rows = list(
        csv.DictReader(
            io.StringIO("\n".join(x for x in text.splitlines() if not x.startswith("#")))
        )
    )
    assert {r["device"] for r in rows} == set(DATASHEET)
    for row in rows:
        device = DeviceSpec.preset(row["device"])
        assert device.peak_flops_bf16 == pytest.approx(
            float(row["peak_tflops_bf16_or_fp16"]) * 1e12
        )
        assert device.hbm_bandwidth == pytest.approx(float(row["hbm_tb_s"]) * 1e12)
    assert set(preset_names()) == {*DATASHEET, "CPU"}


def test_v100_network_is_per_host_shared_by_8_gpus_over_ethernet():
    link = Cluster.from_spec("2x8xV100-16GB").inter_host_link
    assert link.bandwidth == pytest.approx(0.390625e9)
    assert link.latency == ETHERNET_LATENCY_S
    assert Cluster.from_spec("2x8xA100-80GB").inter_host_link == Link(25e9, INFINIBAND_LATENCY_S)


def test_preset_names_are_case_insensitive_and_families_resolve():
    assert DeviceSpec.preset("a100-80gb") == DeviceSpec.preset("A100-80GB")
    assert DeviceSpec.preset("H100") == DeviceSpec.preset("H100-80GB")
    with raises_with(r"'A100' is ambiguous: be specific, one of A100-40GB, A100-80GB"):
        DeviceSpec.preset("A100")
    with raises_with(r"unknown device 'TPUv4'; known devices: V100-16GB, .*CPU"):
        DeviceSpec.preset("TPUv4")


def test_cpu_device_is_a_share_of_the_host():
    device = DeviceSpec.cpu(4, host_memory_bytes=16 * GIB, host_cores=2)
    assert device.is_cpu
    assert device.memory_bytes == 4 * GIB
    assert device.peak_flops(torch.float32) == CPU_CORE_PEAK_FLOPS * 2 / 4
    assert device.peak_flops(torch.bfloat16) == device.peak_flops(torch.float32)
    # dispatch runs on one thread: it slows down only when workers take turns on a core
    assert device.kernel_overhead_s == CPU_KERNEL_OVERHEAD_S * 2
    assert DeviceSpec.cpu(2, host_cores=8).kernel_overhead_s == CPU_KERNEL_OVERHEAD_S
    assert DeviceSpec.preset("A100-80GB").kernel_overhead_s == 0.0
    # so does DTensor's dispatch per op, charged to CPU workers by default, not to GPU presets
    assert device.dtensor_dispatch_s == CPU_DTENSOR_DISPATCH_S * 2
    assert DeviceSpec.cpu(2, host_cores=8).dtensor_dispatch_s == CPU_DTENSOR_DISPATCH_S
    assert DeviceSpec.preset("A100-80GB").dtensor_dispatch_s == 0.0
    # no cache tier unless measured (`hap cluster probe`) or given
    assert (device.cache_bandwidth, device.cache_bytes) == (0.0, 0)
    h100 = DeviceSpec.preset("H100-80GB")
    assert h100.memory_bandwidth(1024) == h100.hbm_bandwidth


def test_peak_flops_of_other_dtypes_is_fp32():
    device = DeviceSpec.preset("A100-80GB")
    assert device.peak_flops(torch.float64) == device.peak_flops_fp32
    assert device.peak_flops(torch.int64) == device.peak_flops_fp32


# ----------------------------------------------------------------------------------- specs


def test_from_spec_parses_hosts_devices_and_type():
    cluster = Cluster.from_spec("16x8xA100-80GB")
    assert (cluster.num_hosts, cluster.devices_per_host, cluster.num_devices) == (16, 8, 128)
    assert cluster.device == DeviceSpec.preset("A100-80GB")
    assert cluster.backend == "nccl"
    assert Cluster.from_spec(" 2 X 4 x h100-80gb ").device.name == "H100-80GB"


def test_local_cpu_is_one_gloo_host_of_cpu_workers():
    cluster = Cluster.local_cpu(4)
    assert (cluster.num_hosts, cluster.devices_per_host, cluster.backend) == (1, 4, "gloo")
    assert cluster.device == DeviceSpec.cpu(4)
    assert cluster.intra_host_link == Link(LOOPBACK_BANDWIDTH, LOOPBACK_LATENCY_S)
    assert cluster.inter_host_link == Link(CPU_INTER_HOST_BANDWIDTH, ETHERNET_LATENCY_S)
    assert Cluster.from_spec("1x4xCPU") == cluster


@pytest.mark.parametrize(
    ("spec", "cause"),
    [
        ("0x8xA100-80GB", "needs at least 1 host and 1 device per host"),
        ("2x0xA100-80GB", "needs at least 1 host and 1 device per host"),
        ("2x8", "does not parse as HOSTSxDEVICESxTYPE"),
        ("-1x8xA100-80GB", "does not parse"),
        ("", "does not parse"),
        ("2x8xTPUv4", "unknown device 'TPUv4'"),
        ("2x8xA100", "ambiguous"),
        (28, "a cluster spec is a string"),
    ],
)
def test_bad_specs_say_why_and_show_an_example(spec, cause):
    with raises_with(cause):
        Cluster.from_spec(spec)


@pytest.mark.parametrize(
    ("build", "cause"),
    [
        (
            lambda: Link(-1e9, 1e-6),
            r"Link.bandwidth must be a finite number > 0.*got -1000000000.0",
        ),
        (lambda: Link(1e9, -1.0), "Link.latency must be a finite number >= 0"),
        (lambda: Link(float("inf"), 0.0), "Link.bandwidth"),
        (
            lambda: Link(1e9, 0.0, {"broadcast": AlphaBeta(1e-6, 1e-9)}),
            "unknown collective 'broadcast'",
        ),
        (lambda: AlphaBeta(-1.0, 1e-9), "AlphaBeta.alpha"),
        (lambda: Cluster.local_cpu(0), r"num_workers must be an integer >= 1"),
        (
            lambda: Cluster(1, 2, DeviceSpec.cpu(2), Link(1e9, 0), Link(1e9, 0), backend="mpi"),
            "backend",
        ),
        (
            lambda: DeviceSpec("X", 0, 1.0, 1.0, 1.0, 1.0),
            "DeviceSpec.memory_bytes must be an integer >= 1",
        ),
    ],
)
def test_bad_fields_say_why_and_show_an_example(build, cause):
    with raises_with(cause):
        build()


# ----------------------------------------------------------------------------------- meshes


def axis_shape(axis: MeshAxis) -> tuple[int, int, int]:
    return axis.size, axis.hosts, axis.devices_per_host


@pytest.mark.parametrize(
    ("shape", "axis0", "axis1"),
    [
        ((2, 8), (2, 2, 1), (8, 1, 8)),  # axis 0 inter-host, axis 1 NVLink
        ((1, 8), (1, 1, 1), (8, 1, 8)),
        ((8, 1), (8, 1, 8), (1, 1, 1)),
        ((4, 4), (4, 2, 2), (4, 1, 4)),  # axis 0 groups: 2 devices on each of 2 hosts
        ((8, 2), (8, 2, 4), (2, 1, 2)),
        ((1, 16), (1, 1, 1), (16, 2, 8)),
        ((16, 1), (16, 2, 8), (1, 1, 1)),
        ((2, 2), (2, 1, 2), (2, 1, 2)),
    ],
)
def test_logical_mesh_axes_follow_the_links_they_cross(shape, axis0, axis1):
    cluster = Cluster.from_spec("2x8xA100-80GB")
    mesh = cluster.logical_mesh(shape)
    assert mesh.shape == shape
    assert mesh.num_devices == shape[0] * shape[1]
    assert (axis_shape(mesh.axes[0]), axis_shape(mesh.axes[1])) == (axis0, axis1)
    assert mesh.axes[0].spans_hosts == (axis0[1] > 1)
    for axis in mesh.axes:
        assert axis.intra_link == cluster.intra_host_link
        assert axis.inter_link == cluster.inter_host_link
        assert axis.splits_evenly


def test_logical_mesh_device_ids_are_row_major_over_host_major_devices():
    cluster = Cluster.from_spec("2x8xA100-80GB")
    assert cluster.logical_mesh((4, 4)).device_ids == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9, 10, 11],
        [12, 13, 14, 15],
    ]
    assert cluster.logical_mesh((2, 2)).device_ids == [[0, 1], [2, 3]]
    assert cluster.submesh(1, 8, host_start=1).logical_mesh((2, 4)).device_ids == [
        [8, 9, 10, 11],
        [12, 13, 14, 15],
    ]
    assert cluster.submesh(1, 4, host_start=1, device_start=4).device_ids == (12, 13, 14, 15)


def test_submesh_of_whole_hosts():
    cluster = Cluster.from_spec("4x8xH100-80GB")
    sub = cluster.submesh(2, 8, host_start=2)
    assert (sub.num_devices, sub.device_ids[0], sub.device_ids[-1]) == (16, 16, 31)
    assert sub == Submesh(cluster, 2, 2, 0, 8)
    mesh = sub.logical_mesh((2, 8))
    assert axis_shape(mesh.axes[0]) == (2, 2, 1)
    assert mesh == LogicalMesh(sub, (2, 8))


def test_irregular_mesh_axes_do_not_split_evenly():
    mesh = Cluster.from_spec("3x8xA100-80GB").logical_mesh((4, 6))
    assert axis_shape(mesh.axes[1]) == (6, 2, 6)  # row 1 = devices 6..11 crosses hosts 0 and 1
    assert not mesh.axes[1].splits_evenly


def test_combined_axes_are_the_whole_mesh():
    cluster = Cluster.from_spec("2x8xA100-80GB")
    for shape in [(4, 4), (2, 8), (8, 2)]:
        assert axis_shape(MeshAxis.combine(cluster.logical_mesh(shape).axes)) == (16, 2, 8)
    assert axis_shape(MeshAxis.combine(cluster.logical_mesh((2, 4)).axes)) == (8, 1, 8)


def test_meshes_are_hashable_values():
    cluster = Cluster.from_spec("2x8xA100-80GB")
    assert hash(cluster.logical_mesh((4, 4))) == hash(cluster.logical_mesh([4, 4]))
    assert len({cluster.logical_mesh((4, 4)).axes[0], cluster.logical_mesh((4, 4)).axes[0]}) == 1


@pytest.mark.parametrize(
    ("make", "cause"),
    [
        (
            lambda c: c.logical_mesh((3, 4)),
            r"logical mesh \(3, 4\) has 12 devices: it must use at most 8",
        ),
        (lambda c: c.logical_mesh((4, 8)), "has 32 devices"),
        (lambda c: c.logical_mesh((0, 8)), "two integers >= 1"),
        (lambda c: c.submesh(2, 4), "must use whole hosts"),
        (lambda c: c.submesh(1, 4, device_start=6), "exceed the 8 devices per host"),
        (lambda c: c.submesh(2, 8, host_start=1), "exceed the cluster's 2 host"),
        (
            lambda c: c.submesh(1, 8).logical_mesh((2, 2)),
            r"logical mesh \(2, 2\) has 4 devices but the submesh has 8",
        ),
        (lambda c: c.submesh(1, 8, host_start=-1), "host_start must be an integer >= 0"),
    ],
)
def test_bad_meshes_say_why(make, cause):
    with raises_with(cause):
        make(Cluster.from_spec("2x8xA100-80GB"))


# ----------------------------------------------------------------------------------- files


def probed_cluster() -> Cluster:
    fits = {
        Collective.ALL_REDUCE: AlphaBeta(3e-4, 8e-10),
        Collective.REDUCE_SCATTER: AlphaBeta(5e-4, 2.6e-9),
    }
    cluster = Cluster.local_cpu(2)
    link = Link(3e9, 3e-4, fits)
    device = dataclasses.replace(
        cluster.device,
        kernel_overhead_s=2.5e-5,
        hbm_bandwidth=5.1e9,
        cache_bandwidth=9.3e9,
        cache_bytes=3 * 2**20,
        dtensor_dispatch_s=6.1e-5,
        compute_scale=1.37,
    )
    return Cluster(1, 2, device, link, cluster.inter_host_link, "gloo")


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
@pytest.mark.parametrize("make", [lambda: Cluster.from_spec("2x8xV100-16GB"), probed_cluster])
def test_file_round_trip(tmp_path, suffix, make):
    cluster = make()
    path = cluster.to_file(tmp_path / f"cluster{suffix}")
    assert Cluster.from_file(path) == cluster
    assert Cluster.from_dict(cluster.to_dict()) == cluster


def test_file_keeps_fitted_collectives(tmp_path):
    path = probed_cluster().to_file(tmp_path / "c.json")
    data = json.loads(path.read_text())
    assert data["intra_host_link"]["collectives"]["reduce_scatter"] == {
        "alpha": 5e-4,
        "beta": 2.6e-9,
    }
    link = Cluster.from_file(path).intra_host_link
    assert link.fit(Collective.REDUCE_SCATTER) == AlphaBeta(5e-4, 2.6e-9)
    assert link.fit(Collective.ALL_TO_ALL) is None


def test_overrides_on_a_spec(tmp_path):
    base = Cluster.from_spec("2x8xA100-80GB")
    cluster = Cluster.from_dict(
        {"spec": "2x8xA100-80GB", "inter_host_link": {"bandwidth_gbps": 100}}
    )
    assert cluster.inter_host_link == Link(100e9 / 8, INFINIBAND_LATENCY_S)
    assert cluster.intra_host_link == base.intra_host_link
    path = tmp_path / "c.yaml"
    path.write_text(
        "spec: 2x8xA100-80GB\n"
        "num_hosts: 4\n"
        "backend: gloo\n"
        "device: {memory_gib: 40, peak_tflops_bf16: 200, kernel_overhead_us: 12,\n"
        "         cache_gb_s: 9.5, cache_mib: 1.5, dtensor_dispatch_us: 61,\n"
        "         compute_scale: 1.3}\n"
        "intra_host_link: {bandwidth_gb_s: 150, latency_us: 2}\n"
        "inter_host_link: {bandwidth: 25e9}\n"  # YAML reads 25e9 as a string
    )
    cluster = Cluster.from_file(path)
    assert (cluster.num_hosts, cluster.devices_per_host, cluster.backend) == (4, 8, "gloo")
    assert cluster.device.memory_bytes == 40 * GIB
    assert cluster.device.peak_flops_bf16 == 200e12
    assert cluster.device.kernel_overhead_s == 12e-6
    assert (cluster.device.cache_bandwidth, cluster.device.cache_bytes) == (9.5e9, 3 * 2**19)
    assert cluster.device.dtensor_dispatch_s == 61e-6
    assert base.device.dtensor_dispatch_s == 0.0
    assert (cluster.device.compute_scale, base.device.compute_scale) == (1.3, 1.0)
    assert cluster.device.peak_flops_fp32 == base.device.peak_flops_fp32
    assert cluster.intra_host_link == Link(150e9, 2e-6)
    assert cluster.inter_host_link == Link(25e9, INFINIBAND_LATENCY_S)


def test_device_name_brings_its_datasheet_links():
    cluster = Cluster.from_dict({"num_hosts": 2, "devices_per_host": 8, "device": "H100-80GB"})
    assert cluster == Cluster.from_spec("2x8xH100-80GB")
    switched = Cluster.from_dict({"spec": "2x8xA100-80GB", "device": "B200-192GB"})
    assert switched == Cluster.from_spec("2x8xB200-192GB")


def test_fully_explicit_custom_device(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps(
            {
                "num_hosts": 2,
                "devices_per_host": 4,
                "device": {
                    "name": "MyAccel",
                    "memory_gib": 32,
                    "peak_tflops_fp32": 10,
                    "peak_tflops_bf16": 100,
                    "peak_tflops_fp16": 100,
                    "hbm_gb_s": 1000,
                },
                "intra_host_link": {"bandwidth_gb_s": 100, "latency_us": 3},
                "inter_host_link": {
                    "bandwidth_gb_s": 10,
                    "latency_us": 20,
                    "collectives": {"all_reduce": {"alpha": 2e-5, "beta": 1e-10}},
                },
            }
        )
    )
    cluster = Cluster.from_file(path)
    assert cluster.device == DeviceSpec("MyAccel", 32 * GIB, 10e12, 100e12, 100e12, 1000e9)
    assert cluster.backend == "nccl"
    assert cluster.inter_host_link == Link(
        10e9, 20e-6, {Collective.ALL_REDUCE: AlphaBeta(2e-5, 1e-10)}
    )


@pytest.mark.parametrize(
    ("name", "text", "cause"),
    [
        ("c.yaml", "spec: [2x8xA100-80GB\n", "is not valid YAML"),
        ("c.json", '{"spec": "2x8xA100-80GB",}', "is not valid JSON"),
        ("c.yaml", "", "a cluster description is a mapping of fields, got NoneType"),
        ("c.yaml", "- 2x8xA100-80GB\n", "mapping of fields, got list"),
        ("c.yaml", "devices_per_host: 8\ndevice: A100-80GB\n", "missing 'num_hosts'"),
        ("c.yaml", "num_hosts: 2\ndevices_per_host: 8\n", "missing 'device'"),
        ("c.yaml", "spec: 2x8xA100-80GB\nhosts: 2\n", r"unknown key\(s\) \['hosts'\] in cluster"),
        (
            "c.yaml",
            "spec: 2x8xA100-80GB\ninter_host_link: {speed: 1}\n",
            r"unknown key\(s\) \['speed'\] in inter_host_link",
        ),
        (
            "c.yaml",
            "spec: 2x8xA100-80GB\ninter_host_link: {bandwidth: -5}\n",
            "inter_host_link: Link.bandwidth must be",
        ),
        (
            "c.yaml",
            "spec: 2x8xA100-80GB\ninter_host_link: {bandwidth: 1, bandwidth_gbps: 2}\n",
            "gives bandwidth twice",
        ),
        (
            "c.yaml",
            "spec: 2x8xA100-80GB\ninter_host_link: {bandwidth: fast}\n",
            "inter_host_link.bandwidth must be a number",
        ),
        ("c.yaml", "spec: 2x8xA100-80GB\nnum_hosts: 1.5\n", "num_hosts must be an integer"),
        ("c.yaml", "spec: 0x8xA100-80GB\n", "needs at least 1 host"),
        (
            "c.yaml",
            "spec: 2x8xA100-80GB\ndevice: {memory_gib: -1}\n",
            "device: DeviceSpec.memory_bytes",
        ),
        (
            "c.yaml",
            "spec: 2x8xA100-80GB\ndevice: {kernel_overhead_s: -1}\n",
            "DeviceSpec.kernel_overhead_s must be a finite number >= 0",
        ),
        (
            "c.yaml",
            "spec: 2x8xA100-80GB\ndevice: {dtensor_dispatch_us: -3}\n",
            "DeviceSpec.dtensor_dispatch_s must be a finite number >= 0",
        ),
        (
            "c.yaml",
            "spec: 2x8xA100-80GB\ndevice: {compute_scale: 0}\n",
            "DeviceSpec.compute_scale must be a finite number > 0",
        ),
        (
            "c.yaml",
            "spec: 2x8xA100-80GB\ndevice: {cache_gb_s: 20}\n",
            "cache_bandwidth and cache_bytes go together",
        ),
        (
            "c.yaml",
            "spec: 2x8xA100-80GB\ndevice: {cache_gb_s: -1, cache_mib: 2}\n",
            "DeviceSpec.cache_bandwidth must be a finite number >= 0",
        ),
        (
            "c.yaml",
            "num_hosts: 1\ndevices_per_host: 1\ndevice: {name: X}\n",
            r"custom device 'X' is missing \['memory_bytes'",
        ),
        (
            "c.yaml",
            "num_hosts: 1\ndevices_per_host: 1\ndevice: {name: X, memory_bytes: 1, peak_flops_fp32: 1, "
            "peak_flops_bf16: 1, peak_flops_fp16: 1, hbm_bandwidth: 1}\n",
            "missing 'intra_host_link'",
        ),
        (
            "c.yaml",
            "spec: 2x8xA100-80GB\nintra_host_link: {latency: 0}\ninter_host_link: 7\n",
            "inter_host_link must be a mapping",
        ),
        (
            "c.yaml",
            "spec: 2x8xA100-80GB\nintra_host_link: {collectives: {all_reduce: {alpha: 1}}}\n",
            "must be a mapping with exactly alpha and beta",
        ),
        (
            "c.yaml",
            "spec: 2x8xA100-80GB\nintra_host_link: {collectives: {gossip: {alpha: 1, beta: 1}}}\n",
            "unknown collective 'gossip'",
        ),
        ("c.yaml", "spec: 2x8xA100-80GB\nbackend: mpi\n", "backend must be one of"),
        ("c.toml", "spec = '2x8xA100-80GB'\n", r"must end in \.yaml, \.yml or \.json"),
    ],
)
def test_bad_files_say_why_and_show_an_example(tmp_path, name, text, cause):
    path = tmp_path / name
    path.write_text(text)
    with raises_with(cause) as info:
        Cluster.from_file(path)
    assert name in str(info.value)


def test_missing_file_says_so(tmp_path):
    with raises_with("cannot read cluster file .*nope.yaml"):
        Cluster.from_file(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------------- Ray


def ray_node(resources: dict, alive: bool = True) -> dict:
    return {"Alive": alive, "Resources": resources}


def test_ray_gpu_nodes_become_hosts_of_datasheet_gpus():
    nodes = [
        ray_node({"CPU": 96, "GPU": 8, "accelerator_type:A100-80G": 1}),
        ray_node({"CPU": 96, "GPU": 8, "accelerator_type:A100-80G": 1}),
        ray_node({"CPU": 8}),  # a head node without GPUs
        ray_node({"CPU": 96, "GPU": 4, "accelerator_type:A100-80G": 1}, alive=False),
    ]
    assert cluster_from_ray_nodes(nodes) == Cluster.from_spec("2x8xA100-80GB")
    h100 = [ray_node({"GPU": 8, "accelerator_type:H100": 1})]
    assert cluster_from_ray_nodes(h100) == Cluster.from_spec("1x8xH100-80GB")


@pytest.mark.parametrize(
    ("nodes", "cause"),
    [
        (
            [ray_node({"GPU": 8, "accelerator_type:A100": 1})],
            "Ray GPU type 'A100': device 'A100' is ambiguous: be specific, one of A100-40GB, A100-80GB",
        ),
        ([ray_node({"GPU": 8, "accelerator_type:H20": 1})], "Ray GPU type 'H20': unknown device"),
        ([ray_node({"GPU": 8})], "no accelerator_type resource"),
        (
            [
                ray_node({"GPU": 8, "accelerator_type:V100": 1}),
                ray_node({"GPU": 4, "accelerator_type:V100": 1}),
            ],
            r"different GPU counts \[4, 8\]",
        ),
        (
            [
                ray_node({"GPU": 8, "accelerator_type:V100": 1}),
                ray_node({"GPU": 8, "accelerator_type:H100": 1}),
            ],
            r"GPU types \['H100', 'V100'\]",
        ),
        ([ray_node({"CPU": 4}), ray_node({"CPU": 2})], r"different CPU counts \[2, 4\]"),
        ([ray_node({"CPU": 4}, alive=False)], "no alive node"),
    ],
)
def test_unusable_ray_clusters_say_why_and_how_to_fix(nodes, cause):
    with raises_with(cause):
        cluster_from_ray_nodes(nodes)


@pytest.mark.timeout(120)
def test_from_ray_on_a_local_cpu_ray():
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    ray.init(num_cpus=4, include_dashboard=False, logging_level="warning")
    try:
        cluster = Cluster.from_ray()
    finally:
        ray.shutdown()
    assert (cluster.num_hosts, cluster.devices_per_host, cluster.backend) == (1, 4, "gloo")
    assert cluster.device.is_cpu
    assert cluster.device.peak_flops_fp32 == CPU_CORE_PEAK_FLOPS


def test_from_ray_without_a_running_ray_says_how_to_fix(monkeypatch):
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def no_cluster(**kwargs):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "init", no_cluster)
    with raises_with("cannot connect to a Ray cluster at 'auto'.*ray start --head"):
        Cluster.from_ray()
