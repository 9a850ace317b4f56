//! The GGUF parser on hand-made files: each header rule, and the message it gives when broken.

mod common;

use braid_quant::{GgmlType, GgufFile, GgufTensorInfo, GgufValue, QuantError};
use common::Builder;

const F32: u32 = 0;
const Q4_0: u32 = 2;

/// A well-formed file: one metadata key, one F32 tensor of four values.
fn small_file(version: u32) -> Vec<u8> {
    let mut b = Builder::header(version, 1, 1);
    b.kv_u32("test.answer", 42)
        .tensor("w", &[4], F32, 0)
        .pad_to(32);
    for v in [1.0f32, -2.5, 0.0, 8.0] {
        b.raw(&v.to_le_bytes());
    }
    b.build()
}

fn parse_err(bytes: Vec<u8>) -> QuantError {
    GgufFile::from_bytes(bytes).expect_err("file should be rejected")
}

#[test]
fn versions_2_and_3_parse_with_the_default_alignment() {
    for version in [2, 3] {
        let file = GgufFile::from_bytes(small_file(version)).unwrap();
        assert_eq!(file.version(), version);
        assert_eq!(file.alignment(), 32);
        assert_eq!(
            file.data_offset(),
            96,
            "a header of 84 bytes rounds up to 96"
        );
        assert_eq!(file.get_u64("test.answer"), Some(42));
        let info = file.tensor("w").unwrap();
        assert_eq!(
            (info.n_elements(), info.n_bytes(), info.shape()),
            (4, 16, vec![4])
        );
        assert_eq!(file.dequantize("w").unwrap(), vec![1.0, -2.5, 0.0, 8.0]);
    }
}

#[test]
fn version_1_and_other_versions_are_refused() {
    let mut bytes = small_file(3);
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert_eq!(
        parse_err(bytes).to_string(),
        "GGUF version 1 is not supported: only versions 2 and 3 are"
    );
    let mut bytes = small_file(3);
    bytes[4..8].copy_from_slice(&7u32.to_le_bytes());
    assert!(matches!(
        parse_err(bytes),
        QuantError::UnsupportedVersion { version: 7 }
    ));
}

#[test]
fn big_endian_files_are_recognised() {
    let mut bytes = small_file(3);
    bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
    let err = parse_err(bytes);
    assert!(matches!(err, QuantError::BigEndian { .. }), "{err}");
    assert!(err.to_string().contains("big-endian"), "{err}");
}

#[test]
fn bad_magic_is_not_a_gguf_file() {
    let mut bytes = small_file(3);
    bytes[..4].copy_from_slice(b"GGML");
    assert_eq!(
        parse_err(bytes).to_string(),
        "not a GGUF file: bad magic \"GGML\", expected \"GGUF\""
    );
    assert!(matches!(
        parse_err(Vec::new()),
        QuantError::Truncated { .. }
    ));
}

#[test]
fn truncated_headers_name_the_field() {
    let mut b = Builder::default();
    b.raw(b"GGUF").u32(3);
    assert_eq!(
        parse_err(b.build()).to_string(),
        "GGUF file is truncated: the tensor count needs bytes 8..16 but the file holds 8"
    );
    let mut b = Builder::header(3, 0, 1);
    b.string("test.key").u32(8).u64(1 << 40);
    let err = parse_err(b.build());
    assert!(
        err.to_string()
            .starts_with("GGUF file is truncated: metadata key 'test.key' needs bytes"),
        "{err}"
    );
}

#[test]
fn absurd_counts_are_rejected_before_allocating() {
    let err = parse_err(Builder::header(3, 0, u64::MAX).build());
    assert!(matches!(err, QuantError::CountTooLarge { .. }), "{err}");
    let err = parse_err(Builder::header(3, 1 << 60, 0).build());
    assert!(err.to_string().contains("the tensor table claims"), "{err}");

    let mut b = Builder::header(3, 0, 1);
    b.string("tokenizer.ggml.tokens")
        .u32(9)
        .u32(8)
        .u64(1 << 50)
        .raw(&[0; 64]);
    let err = parse_err(b.build());
    assert_eq!(
        err.to_string(),
        "GGUF file is corrupt: metadata key 'tokenizer.ggml.tokens' claims 1125899906842624 entries but only 64 bytes remain"
    );
}

#[test]
fn arrays_empty_nested_and_too_deep() {
    let mut b = Builder::header(3, 0, 2);
    b.string("empty").u32(9).u32(4).u64(0);
    b.string("nested").u32(9).u32(9).u64(2);
    b.u32(0).u64(2).raw(&[1, 2]);
    b.u32(8).u64(1).string("x");
    let file = GgufFile::from_bytes(b.build()).unwrap();
    assert_eq!(file.get("empty"), Some(&GgufValue::Array(vec![])));
    assert_eq!(
        file.get("nested"),
        Some(&GgufValue::Array(vec![
            GgufValue::Array(vec![GgufValue::U8(1), GgufValue::U8(2)]),
            GgufValue::Array(vec![GgufValue::String("x".into())]),
        ]))
    );

    let mut b = Builder::header(3, 0, 1);
    b.string("deep").u32(9);
    for _ in 0..40 {
        b.u32(9).u64(1);
    }
    b.u32(0).u64(0);
    let err = parse_err(b.build());
    assert!(matches!(err, QuantError::NestingTooDeep { .. }), "{err}");
}

#[test]
fn unknown_value_types_are_named() {
    let mut b = Builder::header(3, 0, 1);
    b.string("odd").u32(13).u32(0);
    assert_eq!(
        parse_err(b.build()).to_string(),
        "GGUF file is corrupt: metadata key 'odd' has unknown value type id 13, expected 0..=12"
    );
}

#[test]
fn keys_and_names_must_be_unique_and_utf8() {
    let mut b = Builder::header(3, 0, 2);
    b.kv_u32("a", 1).kv_u32("a", 2);
    assert_eq!(
        parse_err(b.build()).to_string(),
        "GGUF file is corrupt: metadata key 'a' appears more than once"
    );

    let mut b = Builder::header(3, 2, 0);
    b.tensor("w", &[4], F32, 0)
        .tensor("w", &[4], F32, 32)
        .pad_to(32)
        .raw(&[0; 64]);
    assert_eq!(
        parse_err(b.build()).to_string(),
        "GGUF file is corrupt: tensor 'w' appears more than once"
    );

    let mut b = Builder::header(3, 0, 1);
    b.u64(2).raw(&[0xff, 0xfe]).u32(4).u32(0);
    assert!(matches!(
        parse_err(b.build()),
        QuantError::InvalidUtf8 { .. }
    ));

    // Values are text for people: an invalid byte is replaced, not fatal.
    let mut b = Builder::header(3, 0, 1);
    b.string("tok").u32(8).u64(3).raw(&[b'a', 0xff, b'b']);
    let file = GgufFile::from_bytes(b.build()).unwrap();
    assert_eq!(file.get_str("tok"), Some("a\u{fffd}b"));
}

#[test]
fn custom_alignment_moves_the_data_section() {
    let mut b = Builder::header(3, 2, 1);
    b.kv_u32("general.alignment", 64)
        .tensor("a", &[3], F32, 0)
        .tensor("b", &[2], F32, 64)
        .pad_to(64);
    let data_offset = b.bytes.len();
    b.raw(&[0; 64])
        .raw(&1.5f32.to_le_bytes())
        .raw(&(-1.5f32).to_le_bytes());
    let file = GgufFile::from_bytes(b.build()).unwrap();
    assert_eq!(
        (file.alignment(), file.data_offset()),
        (64, data_offset as u64)
    );
    assert_eq!(file.dequantize("b").unwrap(), vec![1.5, -1.5]);

    for (value, type_id) in [(0u32, 4u32), (48, 4), (64, 5)] {
        let mut b = Builder::header(3, 0, 1);
        b.string("general.alignment").u32(type_id).u32(value);
        let err = parse_err(b.build());
        assert!(
            matches!(err, QuantError::BadAlignment { .. }),
            "{value}/{type_id}: {err}"
        );
    }
    let mut b = Builder::header(3, 0, 1);
    b.kv_u32("general.alignment", 48);
    assert_eq!(
        parse_err(b.build()).to_string(),
        "GGUF file is corrupt: general.alignment is uint32 48, expected a non-zero power of two of type uint32"
    );
}

#[test]
fn tensor_shapes_are_validated() {
    let shape_err = |dims: &[u64], type_id: u32| {
        let mut b = Builder::header(3, 1, 0);
        b.tensor("t", dims, type_id, 0).pad_to(32);
        parse_err(b.build())
    };
    assert_eq!(
        shape_err(&[1, 1, 1, 1, 1], F32).to_string(),
        "GGUF file is corrupt: tensor 't' has 5 dimensions, expected at most 4"
    );
    assert!(shape_err(&[1 << 32, 1 << 32], F32)
        .to_string()
        .contains("overflows"));
    assert!(shape_err(&[u64::MAX], F32)
        .to_string()
        .contains("overflows"));
    assert_eq!(
        shape_err(&[48, 2], Q4_0).to_string(),
        "GGUF file is corrupt: tensor 't' has 48 values per row, which is not a multiple of the Q4_0 block size 32"
    );
    assert_eq!(
        shape_err(&[32], 4).to_string(),
        "tensor 't': unknown ggml tensor type id 4"
    );
}

#[test]
fn tensor_placement_is_validated() {
    let mut b = Builder::header(3, 1, 0);
    b.tensor("t", &[4], F32, 16).pad_to(32).raw(&[0; 64]);
    assert_eq!(
        parse_err(b.build()).to_string(),
        "GGUF file is corrupt: tensor 't' has offset 16, which is not a multiple of the alignment 32"
    );

    let mut b = Builder::header(3, 1, 0);
    b.tensor("blk.0.attn_q.weight", &[32, 4], Q4_0, 0)
        .pad_to(32)
        .raw(&[0; 64]);
    assert_eq!(
        parse_err(b.build()).to_string(),
        "GGUF file is truncated: tensor 'blk.0.attn_q.weight' needs bytes 0..72 but the data section holds 64"
    );

    let mut b = Builder::header(3, 1, 0);
    b.tensor("far", &[4], F32, u64::MAX - 31)
        .pad_to(32)
        .raw(&[0; 64]);
    assert!(matches!(
        parse_err(b.build()),
        QuantError::TensorOutOfBounds { .. }
    ));
}

#[test]
fn files_without_tensors_need_no_data_section() {
    let mut b = Builder::header(3, 0, 1);
    b.kv_u32("k", 1);
    let file = GgufFile::from_bytes(b.build()).unwrap();
    assert!(file.tensors().is_empty());
}

#[test]
fn unsupported_types_parse_but_do_not_dequantize() {
    let mut b = Builder::header(3, 1, 0);
    b.tensor("iq", &[256], GgmlType::IQ2_XXS.id(), 0)
        .pad_to(32)
        .raw(&[0; 66]);
    let file = GgufFile::from_bytes(b.build()).unwrap();
    let info = file.tensor("iq").unwrap();
    assert_eq!(file.tensor_bytes(info).len(), 66);
    assert_eq!(
        file.dequantize("iq").unwrap_err().to_string(),
        "tensor 'iq': quant type IQ2_XXS is not supported"
    );
}

#[test]
fn foreign_tensor_infos_give_empty_bytes() {
    let file = GgufFile::from_bytes(small_file(3)).unwrap();
    let foreign = GgufTensorInfo {
        name: "elsewhere".into(),
        dims: vec![1 << 20],
        ggml_type: GgmlType::F32,
        offset: 0,
    };
    assert!(file.tensor_bytes(&foreign).is_empty());
}

#[test]
fn open_errors_name_the_path() {
    let missing = std::env::temp_dir().join("braid-quant-no-such-file.gguf");
    let err = GgufFile::open(&missing).unwrap_err();
    assert!(matches!(err, QuantError::Io { .. }));
    assert!(
        err.to_string().contains("braid-quant-no-such-file.gguf"),
        "{err}"
    );

    let dir = std::env::temp_dir().join(format!("braid-quant-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.gguf");
    std::fs::write(&bad, b"GGML\x03\0\0\0").unwrap();
    let err = GgufFile::open(&bad).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: not a GGUF file: bad magic \"GGML\", expected \"GGUF\"",
            bad.display()
        )
    );
    let empty = dir.join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert!(GgufFile::open(&empty)
        .unwrap_err()
        .to_string()
        .contains("truncated"));
    let good = dir.join("good.gguf");
    std::fs::write(&good, small_file(3)).unwrap();
    assert_eq!(
        GgufFile::open(&good).unwrap().dequantize("w").unwrap()[1],
        -2.5
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
