//! Where sampled or decoded images go: one PNG per image, a contact-sheet grid, and the
//! uint8 `.npz` FID evaluators read. Every file is written under a temporary name and
//! renamed; folders are checked before any work starts.

use std::path::{Path, PathBuf};

use clap::Args;
use icdit::fsio::check_writable_dir;
use icdit::image::{self, png_name, Rounding};
use icdit::Error;

#[derive(Args, Default)]
pub struct ImageOut {
    /// Folder for one PNG per image, named `NNNNNN-classC-seedS.png` (index, class, seed).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// One contact-sheet PNG of all images (default samples/grid.png when no other image
    /// output is named).
    #[arg(long)]
    pub grid: Option<PathBuf>,
    /// Images per grid row (default: images per class when sampling every class, else 8).
    #[arg(long)]
    pub grid_cols: Option<usize>,
    /// All images as uint8 NHWC array `arr_0` in an .npz (the ADM FID evaluator's input).
    #[arg(long)]
    pub npz: Option<PathBuf>,
    /// Float to uint8: `dit` (sample_ddp.py's truncating cast, default) or `diffusers`.
    #[arg(long, default_value = "dit")]
    pub rounding: String,
}

impl ImageOut {
    pub fn any(&self) -> bool {
        self.out.is_some() || self.grid.is_some() || self.npz.is_some()
    }

    pub fn rounding(&self) -> Result<Rounding, Error> {
        match self.rounding.as_str() {
            "dit" => Ok(Rounding::Dit),
            "diffusers" => Ok(Rounding::Diffusers),
            other => Err(Error::invalid("--rounding", format!("`{other}`: expected dit or diffusers"))),
        }
    }

    /// Fills in the default grid when nothing is named, checks the rounding, and makes sure
    /// every destination folder exists and is writable, before any sampling is done.
    pub fn prepare(&mut self) -> Result<(), Error> {
        self.rounding()?;
        if !self.any() {
            self.grid = Some(PathBuf::from("samples/grid.png"));
        }
        if let Some(dir) = &self.out {
            check_writable_dir(dir)?;
        }
        for file in [&self.grid, &self.npz].into_iter().flatten() {
            let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            check_writable_dir(dir)?;
        }
        Ok(())
    }

    /// Writes `images` ((C, side, side) floats in [−1, 1] each) where asked; returns the paths.
    pub fn write(
        &self,
        images: &[f32],
        classes: &[i64],
        seed: Option<u64>,
        channels: usize,
        side: usize,
        default_cols: usize,
    ) -> Result<Vec<PathBuf>, Error> {
        self.write_hw(images, classes, seed, channels, (side, side), default_cols)
    }

    /// [`write`](Self::write) for images of (height, width).
    pub fn write_hw(
        &self,
        images: &[f32],
        classes: &[i64],
        seed: Option<u64>,
        channels: usize,
        (h, w): (usize, usize),
        default_cols: usize,
    ) -> Result<Vec<PathBuf>, Error> {
        let n = classes.len();
        let mut pixels = vec![0u8; n * h * w * channels];
        image::to_nhwc_u8_hw(images, n, channels, (h, w), self.rounding()?, &mut pixels);
        let mut written = Vec::new();
        if let Some(dir) = &self.out {
            let per = h * w * channels;
            for (i, &c) in classes.iter().enumerate() {
                let path = dir.join(png_name(i as u64, c, seed));
                image::write_png(&path, &pixels[i * per..(i + 1) * per], w, h, channels)?;
            }
            written.push(dir.clone());
        }
        if let Some(path) = &self.grid {
            let cols = self.grid_cols.unwrap_or(default_cols);
            image::write_grid_png_hw(path, &pixels, n, channels, (h, w), cols, 2)?;
            written.push(path.clone());
        }
        if let Some(path) = &self.npz {
            image::write_npz_hw(path, &pixels, n, (h, w), channels)?;
            written.push(path.clone());
        }
        Ok(written)
    }
}
