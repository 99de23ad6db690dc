//! Takes the few Swagger UI files that `/admin/docs` serves out of the zip that the
//! `utoipa-swagger-ui-vendored` crate ships, into `OUT_DIR/swagger-ui/`, for `include_bytes!`.
//!
//! Nothing is downloaded: the zip comes with the crate from crates.io. Only the files the page
//! loads are kept (about 1.6 MB of the archive's 11 MB; source maps and the other bundles stay
//! out of the binary), and a `sourceMappingURL` line is dropped since no map is served.

use std::io::{Cursor, Read};
use std::path::Path;

/// Files of the archive's `dist/` folder that the page needs.
const FILES: [&str; 3] = [
    "swagger-ui-bundle.js",
    "swagger-ui.css",
    "favicon-32x32.png",
];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    let out = Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("swagger-ui");
    std::fs::create_dir_all(&out).expect("create OUT_DIR/swagger-ui");
    let mut zip =
        zip::ZipArchive::new(Cursor::new(utoipa_swagger_ui_vendored::SWAGGER_UI_VENDORED))
            .expect("the vendored Swagger UI is a zip archive");
    for name in FILES {
        let index = (0..zip.len())
            .find(|&i| {
                zip.name_for_index(i)
                    .is_some_and(|n| n.ends_with(&format!("/dist/{name}")))
            })
            .unwrap_or_else(|| panic!("the vendored Swagger UI has no dist/{name}"));
        let mut bytes = Vec::new();
        zip.by_index(index)
            .and_then(|mut file| Ok(file.read_to_end(&mut bytes)?))
            .unwrap_or_else(|e| panic!("cannot read dist/{name}: {e}"));
        if name.ends_with(".js") || name.ends_with(".css") {
            strip_source_map(&mut bytes);
        }
        std::fs::write(out.join(name), bytes).expect("write a Swagger UI file");
    }
}

/// Drops a last `//# sourceMappingURL=...` or `/*# sourceMappingURL=... */` line: the map is
/// not served, and a browser's developer tools would ask for it.
fn strip_source_map(bytes: &mut Vec<u8>) {
    let end = bytes.trim_ascii_end().len();
    let start = bytes[..end]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let last = bytes[start..end].trim_ascii_start();
    if last.starts_with(b"//# sourceMappingURL=") || last.starts_with(b"/*# sourceMappingURL=") {
        bytes.truncate(start);
    }
}
