"""pdbox's GGUF header reader (`appliance/model/gguf_file.py`) against the ``gguf`` package's reader, its
oracle: the same metadata values and the same tensor views, on the embedded model and on a file holding
every metadata type; and every malformed file refused with a ValueError that says what is wrong."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from appliance.model.errors import ModelLoadError
from appliance.model.gguf_file import read_gguf
from appliance.model.loader import default_model_path, load_checkpoint
from appliance.model.tokenizer import Tokenizer


def assert_same_as_gguf(path: Path) -> None:
    import gguf

    ours, theirs = read_gguf(path), gguf.GGUFReader(str(path))
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]  # the reader's own header entries
    assert list(ours.fields) == keys
    for k in keys:
        assert ours.fields[k] == theirs.fields[k].contents(), k
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.tensor_type == b.tensor_type and a.shape == tuple(int(d) for d in b.shape), a.name
        assert a.offset == b.data_offset, a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data, b.data), a.name


def test_the_embedded_model_reads_as_gguf_reads_it() -> None:
    assert_same_as_gguf(Path(default_model_path()))


def every_type(path: Path) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float32("t.f32", 0.1)
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.strs", ["a", "", "ü"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, 1.5])
    w.add_array("t.empty", [])
    w.add_tensor("f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("f16", np.arange(8, dtype=np.float16).reshape(2, 4))
    q8 = gguf.quants.quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("one", np.ones(5, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_metadata_type_and_tensor_kind(tmp_path) -> None:
    path = every_type(tmp_path / "every.gguf")
    assert_same_as_gguf(path)
    f = read_gguf(path)
    assert f.version == 3
    assert f.fields["t.u64"] == 2**63 + 5 and f.fields["t.str"] == "héllo ✓" and f.fields["t.strs"] == ["a", "", "ü"]
    q8 = {t.name: t for t in f.tensors}["q8"]
    assert q8.shape == (32, 2) and q8.data.shape == (2, 34) and q8.data.dtype == np.uint8  # 2 + 32 bytes a block
    assert not q8.data.flags.writeable


def header(version: int = 3, order: str = "<") -> bytes:
    return b"GGUF" + struct.pack(order + "IQQ", version, 0, 0)


@pytest.mark.parametrize("data,needle", [
    (b"", "empty"),
    (b"GGML" + bytes(20), "no GGUF magic"),
    (header(version=1), "version 1"),
    (header(order=">"), "big-endian"),
    (b"GGUF" + struct.pack("<I", 3) + bytes(5), "truncated"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 3) + b"key" + struct.pack("<I", 99), "value type 99"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IQ", 8, 10**9), "truncated"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 4, 10**12),
     "truncated"),
    # counts no file could hold fail at once, before any item is read
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 2**62),
     "truncated: 4611686018427387904 strings"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 2**40), "truncated: 1099511627776 metadata items"),
    (b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0), "truncated: 1099511627776 tensor entries"),
])
def test_malformed_headers_are_named(tmp_path, data, needle) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=needle):
        read_gguf(path)


def test_mangled_headers_read_or_are_refused(tmp_path) -> None:
    """Random bytes of a real header overwritten: every read returns or raises ValueError, none hangs."""
    full = bytearray(every_type(tmp_path / "every.gguf").read_bytes())
    end = read_gguf(tmp_path / "every.gguf").tensors[0].offset  # the header: everything before the data
    rng = np.random.default_rng(11)
    path = tmp_path / "mangled.gguf"
    outcomes = set()
    for _ in range(300):
        mangled = bytearray(full)
        for at in rng.integers(4, end, size=int(rng.integers(1, 4))):
            mangled[at] = int(rng.integers(0, 256))
        path.write_bytes(bytes(mangled))
        try:
            read_gguf(path)
            outcomes.add("read")
        except ValueError:
            outcomes.add("refused")
    assert outcomes == {"read", "refused"}


@pytest.mark.parametrize("alignment,vtype", [(0, "UINT32"), ("32", "STRING"), ([32], "ARRAY")])
def test_a_bad_alignment_is_named(tmp_path, alignment, vtype) -> None:
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "a.gguf"), "llama")
    w.add_key_value("general.alignment", alignment, gguf.GGUFValueType[vtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(ValueError, match="general.alignment must be an integer > 0"):
        read_gguf(tmp_path / "a.gguf")


def tensor_entry(name: bytes, dims: tuple[int, ...], ttype: int, offset: int) -> bytes:
    return (struct.pack("<Q", len(name)) + name + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", ttype, offset))


@pytest.mark.parametrize("entries,needle", [
    ([(b"w", (4,), 0, 0), (b"w", (4,), 0, 16)], "'w' appears twice"),
    ([(b"w", (4,), 77, 0)], "unknown type 77"),
    ([(b"w", (1024,), 0, 0)], "runs past the end"),
    ([(b"w", (16,), 8, 0)], "not whole Q8_0 blocks of 32"),
])
def test_bad_tensor_entries_are_named(tmp_path, entries, needle) -> None:
    body = b"GGUF" + struct.pack("<IQQ", 3, len(entries), 0) + b"".join(tensor_entry(*e) for e in entries)
    path = tmp_path / "bad.gguf"
    path.write_bytes(body + bytes(-len(body) % 32) + bytes(64))
    with pytest.raises(ValueError, match=needle):
        read_gguf(path)


def test_a_cut_model_file_is_a_load_error_for_weights_and_tokenizer(tmp_path) -> None:
    path = every_type(tmp_path / "every.gguf")
    full, last = path.read_bytes(), read_gguf(path).tensors[-1]
    assert full[last.offset:last.offset + 20] == np.ones(5, dtype=np.float32).tobytes()
    for cut in (len(full) // 3, last.offset + 4):  # in the metadata; in the last tensor's data
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(full[:cut])
        with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
            load_checkpoint(str(path))
        with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
            Tokenizer.from_gguf(path)
