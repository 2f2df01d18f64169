//! Named shape sets for `bench` and `check`, and explicit shapes like `2x320x64x64:32`.

use super::args::UsageError;

/// One benchmark or check shape: logical dims `(N, C, *spatial)` and a group count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Logical dims.
    pub dims: Vec<usize>,
    /// Groups.
    pub groups: usize,
}

impl Shape {
    fn new(dims: &[usize], groups: usize) -> Shape {
        Shape {
            dims: dims.to_vec(),
            groups,
        }
    }

    /// Elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// `2x320x64x64:32`, the form the command line takes.
    pub fn label(&self) -> String {
        let dims: Vec<String> = self.dims.iter().map(|d| d.to_string()).collect();
        format!("{}:{}", dims.join("x"), self.groups)
    }
}

/// Stable Diffusion (v1.x/2.x) activations that go through GroupNorm(32): the UNet's resnet
/// blocks at a 64x64 latent, and the VAE decoder up to 512x512 pixels; at N = 1, 2 and 8.
pub fn sd() -> Vec<Shape> {
    let per_image: &[(usize, usize)] = &[
        // UNet: (channels, side)
        (320, 64),
        (640, 32),
        (1280, 16),
        (1280, 8),
        (2560, 8),
        (1920, 16),
        (960, 32),
        (640, 64),
        // VAE decoder
        (512, 64),
        (512, 128),
        (256, 256),
        (128, 512),
    ];
    let mut v = Vec::new();
    for n in [1, 2, 8] {
        for &(c, side) in per_image {
            v.push(Shape::new(&[n, c, side, side], 32));
        }
    }
    v
}

/// A few quick shapes, including odd ones.
pub fn small() -> Vec<Shape> {
    vec![
        Shape::new(&[1, 32, 8, 8], 32),
        Shape::new(&[4, 64, 16, 16], 32),
        Shape::new(&[2, 128, 32, 32], 32),
        Shape::new(&[3, 60, 7, 9], 6),
        Shape::new(&[16, 256], 8),
    ]
}

/// Large activations: the biggest VAE rows and a long single-group tensor.
pub fn large() -> Vec<Shape> {
    vec![
        Shape::new(&[1, 128, 512, 512], 32),
        Shape::new(&[1, 256, 256, 256], 32),
        Shape::new(&[8, 512, 128, 128], 32),
        Shape::new(&[1, 64, 1024, 1024], 32),
        Shape::new(&[4, 32, 1 << 20], 1),
    ]
}

/// Parses a comma-separated list of set names (`sd`, `small`, `large`, `all`) and explicit
/// shapes (`2x320x64x64:32`, groups default 32), in order.
pub fn parse(spec: &str) -> Result<Vec<Shape>, UsageError> {
    let mut out = Vec::new();
    for one in spec.split(',') {
        match one {
            "sd" => out.extend(sd()),
            "small" => out.extend(small()),
            "large" => out.extend(large()),
            "all" => out.extend([small(), sd(), large()].concat()),
            _ => out.push(parse_one(one)?),
        }
    }
    Ok(out)
}

fn parse_one(one: &str) -> Result<Shape, UsageError> {
    let bad = || {
        UsageError(format!(
            "--shapes: `{one}` is neither a set (sd, small, large, all) nor a shape like \
             2x320x64x64:32"
        ))
    };
    let (dims, groups) = match one.split_once(':') {
        Some((d, g)) => (d, g.parse().map_err(|_| bad())?),
        None => (one, 32),
    };
    let dims: Vec<usize> = dims
        .split('x')
        .map(|d| d.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    if dims.len() < 2 {
        return Err(bad());
    }
    Ok(Shape::new(&dims, groups))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_and_explicit_shapes() {
        assert_eq!(sd().len(), 36);
        assert!(sd().iter().all(|s| s.dims[1] % s.groups == 0));
        let v = parse("2x320x64x64:32,1x64x8").unwrap();
        assert_eq!(v[0], Shape::new(&[2, 320, 64, 64], 32));
        assert_eq!(v[1], Shape::new(&[1, 64, 8], 32));
        assert_eq!(v[0].label(), "2x320x64x64:32");
        assert!(parse("2x320:abc").is_err());
        assert!(parse("320").is_err());
        assert!(parse("medium").is_err());
        assert_eq!(parse("small,1x64x8").unwrap().len(), small().len() + 1);
    }

    /// scripts/bench_torch.py keeps its own copy of the `sd` set (it runs where no Rust is);
    /// the two must time the same shapes. Read from the workspace root (cargo runs this test in
    /// cli/), else relative to the working directory (the GPU machine runs it from the root).
    #[test]
    fn the_torch_script_times_the_same_sd_shapes() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/bench_torch.py");
        let path = if std::path::Path::new(root).is_file() {
            root
        } else {
            "scripts/bench_torch.py"
        };
        let script = std::fs::read_to_string(path).expect("scripts/bench_torch.py");
        let block = script
            .split("# BEGIN SD SHAPES")
            .nth(1)
            .and_then(|s| s.split("# END SD SHAPES").next())
            .expect("SD SHAPES markers");
        let nums: Vec<usize> = block
            .split(|c: char| !c.is_ascii_digit())
            .filter(|t| !t.is_empty())
            .map(|t| t.parse().unwrap())
            .collect();
        let python: Vec<(usize, usize)> = nums.chunks(2).map(|p| (p[0], p[1])).collect();
        let rust: Vec<(usize, usize)> = sd()
            .iter()
            .filter(|s| s.dims[0] == 1)
            .map(|s| (s.dims[1], s.dims[2]))
            .collect();
        assert_eq!(python, rust);
    }
}
