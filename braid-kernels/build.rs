//! Build script of braid-kernels: compiles every `cuda/*.cu` to a fatbin with nvcc and generates
//! the Rust file that embeds them, plus the launch constants shared through `cuda/common.cuh`.
//!
//! Without nvcc the crate still builds (CUDA paths then report that the kernels were not built)
//! unless `BRAID_REQUIRE_NVCC=1`, which CI sets so a kernel that does not compile fails the build.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// SASS for the H100 (the `a` variant unlocks wgmma/TMA), plus compute_80 PTX so other GPUs can
/// JIT the kernels. The `-arch=sm_90a` shorthand cannot be used: with `-fatbin` it fails on wgmma
/// code, while the explicit `-gencode` pairs work.
const GENCODE: &[&str] = &[
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_80,code=compute_80",
];

/// Plain -O3 without --use_fast_math: the softmax-like kernels rely on precise expf and division.
/// The fatbins are compressed for size (the driver inflates them at load time): about half the
/// bytes of the default compression, which keeps every binary embedding them small enough for
/// the device bundle.
const NVCC_FLAGS: &[&str] = &[
    "-fatbin",
    "-O3",
    "-std=c++17",
    "-lineinfo",
    "-Xfatbin=-compress-all",
    "--compress-mode=size",
];

/// The CUDA release the GPU hosts' driver (580) supports; newer nvcc emits PTX it cannot load.
const SUPPORTED_CUDA: (u32, u32) = (13, 0);

const INSTALL_HINT: &str = "install the pinned nvcc with `python3 -m pip install --no-deps --target DIR \
nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 \
nvidia-cuda-cccl==13.0.85` and set NVCC=DIR/nvidia/cu13/bin/nvcc";

const ENV_VARS: &[&str] = &[
    "NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "NVCC_CCBIN",
    "BRAID_REQUIRE_NVCC",
];

fn main() {
    if let Err(message) = run() {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    println!("cargo::rustc-check-cfg=cfg(braid_cuda_kernels)");
    println!("cargo::rerun-if-changed=build.rs");
    for var in ENV_VARS {
        println!("cargo::rerun-if-env-changed={var}");
    }

    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env_var("OUT_DIR")?);
    let cuda_dir = manifest_dir.join("cuda");
    println!("cargo::rerun-if-changed={}", cuda_dir.display());

    let (sources, headers) = list_cuda_files(&cuda_dir)?;
    for file in sources.iter().chain(&headers) {
        println!("cargo::rerun-if-changed={}", file.display());
    }
    let constants = read_shared_constants(&cuda_dir.join("common.cuh"))?;

    let required = is_truthy(env::var("BRAID_REQUIRE_NVCC").ok().as_deref());
    let modules = match find_nvcc()? {
        Some(nvcc) => {
            println!("cargo::rerun-if-changed={}", nvcc.display());
            check_nvcc_version(&nvcc)?;
            compile_all(&nvcc, &cuda_dir, &sources, &out_dir)?
        }
        None if required => {
            return Err(format!(
                "BRAID_REQUIRE_NVCC is set but nvcc was not found (looked at $NVCC, $CUDA_HOME/bin, \
                 $CUDA_PATH/bin, PATH and /usr/local/cuda/bin); {INSTALL_HINT}."
            ));
        }
        None => {
            println!(
                "cargo::warning=braid-kernels built without CUDA kernels: nvcc was not found, so \
                 CUDA ops will report it at run time; {INSTALL_HINT}."
            );
            Vec::new()
        }
    };
    if !modules.is_empty() {
        println!("cargo::rustc-cfg=braid_cuda_kernels");
    }

    let generated = generate_rust(&modules, &constants);
    let target = out_dir.join("cuda_modules.rs");
    fs::write(&target, generated).map_err(|e| format!("could not write {}: {e}", target.display()))
}

fn env_var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|_| format!("cargo did not set {name} for the build script"))
}

fn is_truthy(value: Option<&str>) -> bool {
    matches!(value.map(str::trim), Some("1" | "true" | "yes" | "on"))
}

/// Returns the `.cu` files (each becomes one module) and the `.cuh` headers, sorted so the
/// generated module table is stable.
fn list_cuda_files(cuda_dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>), String> {
    let entries = fs::read_dir(cuda_dir).map_err(|e| {
        format!(
            "could not read the kernel folder {}: {e}",
            cuda_dir.display()
        )
    })?;
    let mut sources = Vec::new();
    let mut headers = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| format!("could not list {}: {e}", cuda_dir.display()))?
            .path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("cu") => sources.push(path),
            Some("cuh") => headers.push(path),
            _ => {}
        }
    }
    sources.sort();
    headers.sort();
    Ok((sources, headers))
}

/// Reads every `#define BRAID_<NAME> <integer>` of the shared header, so the Rust launcher and
/// the kernels cannot disagree on block sizes and limits.
fn read_shared_constants(header: &Path) -> Result<Vec<(String, u32)>, String> {
    let text = fs::read_to_string(header).map_err(|e| {
        format!(
            "could not read the shared kernel header {}: {e}",
            header.display()
        )
    })?;
    let mut constants = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("#define") {
            continue;
        }
        let (Some(name), Some(value)) = (words.next(), words.next()) else {
            continue;
        };
        let Some(short) = name.strip_prefix("BRAID_") else {
            continue;
        };
        // Function-like macros (kernel definition helpers) are not constants.
        if short.contains('(') {
            continue;
        }
        let value: u32 = value.parse().map_err(|_| {
            format!(
                "{}: {name} must be a plain decimal integer below 2^32 so Rust can share it, found `{value}`",
                header.display()
            )
        })?;
        constants.push((short.to_string(), value));
    }
    Ok(constants)
}

/// Looks for nvcc in the documented order and resolves symlinks: nvcc finds cicc, its headers and
/// its profile relative to its own real location, so running it through a link breaks it.
fn find_nvcc() -> Result<Option<PathBuf>, String> {
    if let Some(explicit) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(explicit);
        return match executable(&path) {
            Some(real) => Ok(Some(real)),
            None => Err(format!(
                "NVCC is set to {}, which is not an nvcc executable.",
                path.display()
            )),
        };
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var).filter(|v| !v.is_empty()) {
            if let Some(real) = executable(&Path::new(&root).join("bin").join("nvcc")) {
                return Ok(Some(real));
            }
        }
    }
    // Watched only once the search reaches PATH: otherwise every shell that changes PATH would
    // rebuild the kernels.
    println!("cargo::rerun-if-env-changed=PATH");
    if let Some(paths) = env::var_os("PATH") {
        for dir in env::split_paths(&paths) {
            if let Some(real) = executable(&dir.join("nvcc")) {
                return Ok(Some(real));
            }
        }
    }
    Ok(executable(Path::new("/usr/local/cuda/bin/nvcc")))
}

fn executable(path: &Path) -> Option<PathBuf> {
    fs::canonicalize(path).ok().filter(|real| real.is_file())
}

fn check_nvcc_version(nvcc: &Path) -> Result<(), String> {
    let output = Command::new(nvcc)
        .arg("--version")
        .output()
        .map_err(|e| format!("could not run nvcc at {}: {e}", nvcc.display()))?;
    if !output.status.success() {
        return Err(format!(
            "nvcc at {} failed to report its version: {}",
            nvcc.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let release = text.split("release ").nth(1).and_then(|rest| {
        let number = rest.split(',').next()?;
        let mut parts = number.trim().split('.');
        Some((
            parts.next()?.parse::<u32>().ok()?,
            parts.next()?.parse::<u32>().ok()?,
        ))
    });
    match release {
        Some(version) if version > SUPPORTED_CUDA => println!(
            "cargo::warning=nvcc at {} is CUDA {}.{}, newer than the {}.{} the GPU hosts' driver \
             supports: its PTX may fail to load there; {INSTALL_HINT}.",
            nvcc.display(),
            version.0,
            version.1,
            SUPPORTED_CUDA.0,
            SUPPORTED_CUDA.1
        ),
        Some(_) => {}
        None => println!(
            "cargo::warning=could not read the CUDA release from `{} --version`; compiling anyway.",
            nvcc.display()
        ),
    }
    Ok(())
}

/// Include folders of nvcc's own toolkit. nvcc's profile adds them too, but the pip wheels put
/// the cccl headers (needed by cuda_bf16.h) in `include/cccl`, and stating both keeps the build
/// independent of how that profile resolves its paths.
fn toolkit_include_args(nvcc: &Path) -> Vec<String> {
    let mut args = Vec::new();
    let Some(root) = nvcc.parent().and_then(Path::parent) else {
        return args;
    };
    let include = root.join("include");
    if include.is_dir() {
        args.push(format!("-I{}", include.display()));
        let cccl = include.join("cccl");
        if cccl.is_dir() {
            args.push("-isystem".to_string());
            args.push(cccl.display().to_string());
        }
    }
    args
}

fn nvcc_command(nvcc: &Path, cuda_dir: &Path, source: &Path, output: &Path) -> Command {
    let mut cmd = Command::new(nvcc);
    cmd.args(NVCC_FLAGS)
        .args(GENCODE)
        .arg(format!("-I{}", cuda_dir.display()))
        .args(toolkit_include_args(nvcc));
    if let Some(ccbin) = env::var_os("NVCC_CCBIN").filter(|v| !v.is_empty()) {
        cmd.arg("-ccbin").arg(ccbin);
    }
    cmd.arg(source)
        .arg("-o")
        .arg(output)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Compiles the sources in parallel (as many at once as cargo gives this build jobs) and returns
/// `(module name, fatbin path)` in source order.
fn compile_all(
    nvcc: &Path,
    cuda_dir: &Path,
    sources: &[PathBuf],
    out_dir: &Path,
) -> Result<Vec<(String, PathBuf)>, String> {
    let jobs = env::var("NUM_JOBS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let mut modules = Vec::with_capacity(sources.len());
    for batch in sources.chunks(jobs) {
        let mut running: Vec<(String, PathBuf, &PathBuf, Child)> = Vec::with_capacity(batch.len());
        for source in batch {
            let name = source
                .file_stem()
                .and_then(|s| s.to_str())
                .ok_or_else(|| format!("kernel file name {} is not valid UTF-8", source.display()))?
                .to_string();
            let fatbin = out_dir.join(format!("{name}.fatbin"));
            let child = nvcc_command(nvcc, cuda_dir, source, &fatbin)
                .spawn()
                .map_err(|e| format!("could not start nvcc at {}: {e}", nvcc.display()))?;
            running.push((name, fatbin, source, child));
        }
        for (name, fatbin, source, child) in running {
            let output = child
                .wait_with_output()
                .map_err(|e| format!("nvcc compiling {} did not finish: {e}", source.display()))?;
            let stderr = String::from_utf8_lossy(&output.stderr);
            if !output.status.success() {
                return Err(format!(
                    "nvcc failed to compile {} ({}):\n{}{}",
                    source.display(),
                    output.status,
                    String::from_utf8_lossy(&output.stdout),
                    stderr
                ));
            }
            for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
                println!("cargo::warning={}: {line}", source.display());
            }
            modules.push((name, fatbin));
        }
    }
    Ok(modules)
}

fn generate_rust(modules: &[(String, PathBuf)], constants: &[(String, u32)]) -> String {
    let mut out = String::from(
        "// Generated by braid-kernels/build.rs from cuda/; edits are overwritten.\n\n",
    );
    if !modules.is_empty() {
        out.push_str(
            "/// 16-byte aligned storage, so each embedded fatbin can be handed to the driver as is.\n\
             #[repr(C)]\n\
             struct AlignedBytes<B: ?Sized> {\n    _align: [u128; 0],\n    bytes: B,\n}\n\n",
        );
    }
    out.push_str("/// `(module name, fatbin)` for every compiled `cuda/*.cu`.\n");
    out.push_str("pub(crate) static MODULES: &[(&str, &[u8])] = &[\n");
    for (name, fatbin) in modules {
        let path = fatbin.display().to_string();
        let _ = writeln!(
            out,
            "    ({name:?}, {{\n        static ALIGNED: &AlignedBytes<[u8]> = &AlignedBytes {{ _align: [], bytes: *include_bytes!({path:?}) }};\n        &ALIGNED.bytes\n    }}),"
        );
    }
    out.push_str("];\n\n");
    out.push_str("/// Constants shared with the kernels through `cuda/common.cuh`.\n");
    out.push_str("#[allow(dead_code)]\npub(crate) mod consts {\n");
    for (name, value) in constants {
        let _ = writeln!(out, "    pub(crate) const {name}: u32 = {value};");
    }
    out.push_str("}\n");
    out
}
