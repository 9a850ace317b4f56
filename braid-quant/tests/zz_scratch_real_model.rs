use braid_quant::GgufFile;
#[test]
fn real_model() {
    let p = std::path::Path::new("/root/.cache/braid/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf");
    let t0 = std::time::Instant::now();
    let f = GgufFile::open(p).unwrap();
    println!("parse {:?} {:?}", t0.elapsed(), f);
    println!("arch {:?} layers {:?} tmpl {}", f.get_str("general.architecture"), f.get_u64("llama.block_count"), f.get_str("tokenizer.chat_template").map(|s| s.len()).unwrap_or(0));
    println!("tokens {}", f.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).map(|a| a.len()).unwrap_or(0));
    let t0 = std::time::Instant::now();
    let mut total = 0;
    for t in f.tensors() { total += f.dequantize(&t.name).unwrap().len(); }
    println!("dequant all {total} in {:?}", t0.elapsed());
    for name in ["token_embd.weight","blk.0.attn_q.weight","blk.29.ffn_down.weight","output_norm.weight","blk.3.attn_v.weight"] {
        let v = f.dequantize(name).unwrap();
        let r: Vec<f32> = std::fs::read(format!("/tmp/smolref/{name}.f32")).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(v.len(), r.len());
        let bad = v.iter().zip(&r).filter(|(a,b)| a.to_bits()!=b.to_bits()).count();
        println!("{name}: {} values, {bad} differ", v.len());
        assert_eq!(bad, 0);
    }
}
