//! Braid's parser and dequantizers against the reference `gguf` Python package
//! (fixtures written by scripts/make_gguf_fixtures.py).

mod common;

use braid_quant::{dequantize, GgmlType, GgufFile, GgufValue};
use common::{fixture_bytes, fixtures, index, read_f32};
use serde_json::Value;

/// Exact for plain float types (NaN only has to stay NaN); within 1e-6 for block formats.
fn assert_matches(ty: GgmlType, what: &str, actual: &[f32], expected: &[f32]) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let exact = matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let ok = if e.is_nan() {
            a.is_nan()
        } else if exact {
            a.to_bits() == e.to_bits()
        } else {
            (a - e).abs() <= 1e-6 || a == e
        };
        assert!(
            ok,
            "{what}: value {i} is {a:e} ({:#010x}), expected {e:e} ({:#010x})",
            a.to_bits(),
            e.to_bits()
        );
    }
}

#[test]
fn every_type_dequantizes_like_the_reference() {
    let index = index();
    let entries = index["dequant"].as_array().expect("dequant list");
    let mut seen = Vec::new();
    for entry in entries {
        let name = entry["type"].as_str().unwrap();
        let ty = GgmlType::from_id(entry["type_id"].as_u64().unwrap() as u32).unwrap();
        assert_eq!(ty.name(), name);
        let raw = fixture_bytes(entry["raw"].as_str().unwrap());
        let expected = read_f32(entry["expected"].as_str().unwrap());
        let values = dequantize(ty, &raw, expected.len()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_matches(ty, name, &values, &expected);
        // The random-block fixtures must really exercise the arithmetic, not decode zeros.
        assert!(
            values.iter().filter(|v| **v != 0.0).count() > values.len() / 2,
            "{name}"
        );
        seen.push(ty);
    }
    for required in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
        GgmlType::MXFP4,
    ] {
        assert!(seen.contains(&required), "no fixture for {required}");
    }
}

/// Compares a parsed value with its typed JSON description `{"type": ..., "value": ...}`.
fn assert_value(key: &str, expected: &Value, actual: &GgufValue) {
    let ty = expected["type"].as_str().unwrap();
    let v = &expected["value"];
    assert_eq!(actual.type_name(), ty, "{key}: type");
    match ty {
        "uint8" | "uint16" | "uint32" | "uint64" => {
            assert_eq!(actual.as_u64(), v.as_u64(), "{key}")
        }
        "int8" | "int16" | "int32" | "int64" => assert_eq!(actual.as_i64(), v.as_i64(), "{key}"),
        "float32" => assert_eq!(actual, &GgufValue::F32(v.as_f64().unwrap() as f32), "{key}"),
        "float64" => assert_eq!(actual, &GgufValue::F64(v.as_f64().unwrap()), "{key}"),
        "bool" => assert_eq!(actual.as_bool(), v.as_bool(), "{key}"),
        "string" => assert_eq!(actual.as_str(), v.as_str(), "{key}"),
        "array" => {
            let items = actual.as_array().unwrap();
            let expected_items = v.as_array().unwrap();
            assert_eq!(items.len(), expected_items.len(), "{key}: array length");
            for (i, (e, a)) in expected_items.iter().zip(items).enumerate() {
                assert_value(&format!("{key}[{i}]"), e, a);
            }
        }
        other => panic!("{key}: unexpected type {other} in the index"),
    }
}

fn check_file(file: &GgufFile, entry: &Value) {
    let name = entry["file"].as_str().unwrap();
    assert_eq!(
        u64::from(file.version()),
        entry["version"].as_u64().unwrap(),
        "{name}"
    );
    assert_eq!(
        file.alignment(),
        entry["alignment"].as_u64().unwrap(),
        "{name}"
    );
    assert_eq!(file.data_offset() % file.alignment(), 0, "{name}");

    let metadata = entry["metadata"].as_object().unwrap();
    assert_eq!(file.metadata().len(), metadata.len(), "{name}: key count");
    for (key, expected) in metadata {
        let actual = file
            .get(key)
            .unwrap_or_else(|| panic!("{name}: missing key {key}"));
        assert_value(key, expected, actual);
    }

    let tensors = entry["tensors"].as_array().unwrap();
    assert_eq!(file.tensors().len(), tensors.len(), "{name}: tensor count");
    for (expected, info) in tensors.iter().zip(file.tensors()) {
        let tname = expected["name"].as_str().unwrap();
        assert_eq!(info.name, tname, "{name}: tensors keep file order");
        assert_eq!(file.tensor(tname), Some(info));
        assert_eq!(
            info.ggml_type.name(),
            expected["type"].as_str().unwrap(),
            "{tname}"
        );
        let dims: Vec<u64> = expected["dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(info.dims, dims, "{tname}");
        let shape: Vec<usize> = dims.iter().rev().map(|&d| d as usize).collect();
        assert_eq!(info.shape(), shape, "{tname}");
        assert_eq!(info.offset % file.alignment(), 0, "{tname}");
        assert_eq!(
            file.tensor_bytes(info).len() as u64,
            info.n_bytes(),
            "{tname}"
        );
        let values = file.dequantize(tname).unwrap();
        assert_eq!(values.len() as u64, info.n_elements(), "{tname}");
        assert_matches(
            info.ggml_type,
            tname,
            &values,
            &read_f32(expected["expected"].as_str().unwrap()),
        );
    }
}

#[test]
fn fixture_files_parse_to_the_expected_metadata_and_tensors() {
    let index = index();
    for entry in index["gguf_files"].as_array().unwrap() {
        let path = fixtures().join(entry["file"].as_str().unwrap());
        let mapped = GgufFile::open(&path).unwrap();
        check_file(&mapped, entry);
        let owned = GgufFile::from_bytes(std::fs::read(&path).unwrap()).unwrap();
        check_file(&owned, entry);
    }
}

#[test]
fn typed_getters_convert_where_lossless() {
    let file = GgufFile::open(&fixtures().join("metadata.gguf")).unwrap();
    assert_eq!(file.get_str("general.architecture"), Some("llama"));
    assert_eq!(file.get_u64("test.context_length"), Some(2048));
    assert_eq!(file.get_u64("test.u8"), Some(200));
    assert_eq!(file.get_u64("test.u64"), Some((1 << 63) + 5));
    assert_eq!(
        file.get_u64("test.i8"),
        None,
        "negative integers are not u64"
    );
    assert_eq!(
        file.get("test.u64").and_then(GgufValue::as_i64),
        None,
        "too large for i64"
    );
    assert_eq!(
        file.get("test.i64").and_then(GgufValue::as_i64),
        Some(-(1 << 62) - 3)
    );
    assert_eq!(file.get_f64("test.f64"), Some(-std::f64::consts::E));
    assert_eq!(file.get_f64("test.f32"), Some(f64::from(0.1f32)));
    assert_eq!(file.get_f64("test.i16"), Some(-30000.0));
    assert_eq!(file.get_bool("test.bool_true"), Some(true));
    assert_eq!(file.get_bool("test.bool_false"), Some(false));
    assert_eq!(file.get_bool("test.u8"), None);
    assert_eq!(file.get_str("test.u8"), None);
    assert_eq!(file.get_u64("no.such.key"), None);
    let nested = file
        .get("test.array.nested")
        .and_then(GgufValue::as_array)
        .unwrap();
    assert_eq!(
        nested[2],
        GgufValue::Array(vec![
            GgufValue::I32(4),
            GgufValue::I32(5),
            GgufValue::I32(6)
        ])
    );
}

#[test]
fn version_2_files_read_like_version_3() {
    let mut bytes = fixture_bytes("metadata.gguf");
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let v2 = GgufFile::from_bytes(bytes).unwrap();
    let v3 = GgufFile::open(&fixtures().join("metadata.gguf")).unwrap();
    assert_eq!(v2.version(), 2);
    assert_eq!(v3.version(), 3);
    assert_eq!(v2.metadata(), v3.metadata());
    assert_eq!(v2.tensors(), v3.tensors());
    for info in v3.tensors() {
        assert_eq!(v2.tensor_bytes(info), v3.tensor_bytes(info));
    }
}

#[test]
fn missing_tensors_are_named() {
    let file = GgufFile::open(&fixtures().join("metadata.gguf")).unwrap();
    let err = file.dequantize("blk.9.attn_q.weight").unwrap_err();
    assert_eq!(
        err.to_string(),
        "tensor 'blk.9.attn_q.weight' is not in the GGUF file"
    );
}
