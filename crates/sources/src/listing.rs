//! What a source holds now: the files of a folder, the pages a sitemap lists,
//! the entries of a feed.

use std::path::{Path, PathBuf};

/// Extensions of the files a folder source takes (the formats ragd reads).
const EXTENSIONS: &[&str] = &[
    "txt", "text", "md", "markdown", "mdx", "rst", "adoc", "org", "html", "htm", "xhtml", "pdf",
    "docx", "odt", "csv", "json", "yaml", "yml", "toml", "log",
];

/// A file of a folder source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileItem {
    /// Its path.
    pub path: PathBuf,
    /// Its path under the folder, with `/` between parts.
    pub relative: String,
    /// Modification time, nanoseconds since the Unix epoch (-1: its
    /// metadata could not be read).
    pub modified_ns: i128,
    /// Size in bytes.
    pub size: u64,
}

/// The files under `root` that ragd reads: regular files (symbolic links are
/// not followed, so a source cannot reach outside its folder), not hidden,
/// with a known extension; at most `max`, in path order, and whether there
/// were more. Blocking.
pub fn folder(root: &Path, max: usize) -> Result<(Vec<FileItem>, bool), String> {
    if !root.is_dir() {
        return Err(format!("{} is not a folder (any more)", root.display()));
    }
    let mut out = Vec::new();
    let walk = walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'));
    for entry in walk {
        let entry = entry.map_err(|e| format!("reading {}: {e}", root.display()))?;
        if !entry.file_type().is_file() {
            continue;
        }
        let ext = entry
            .path()
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        if !EXTENSIONS.contains(&ext.as_str()) {
            continue;
        }
        if out.len() >= max {
            return Ok((out, true));
        }
        // A file whose metadata cannot be read is listed (so that its
        // document is kept) and fails on its own.
        let meta = entry.metadata().ok();
        let modified_ns = meta
            .as_ref()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(-1, |d| d.as_nanos() as i128);
        let relative = entry
            .path()
            .strip_prefix(root)
            .unwrap_or(entry.path())
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        out.push(FileItem {
            path: entry.path().to_path_buf(),
            relative,
            modified_ns,
            size: meta.map_or(0, |m| m.len()),
        });
    }
    Ok((out, false))
}

/// What an XML document found at a source's URL is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listing {
    /// A sitemap: these pages.
    Sitemap(Vec<String>),
    /// A sitemap index: these sitemaps.
    SitemapIndex(Vec<String>),
    /// An RSS or Atom feed: these entries' links.
    Feed(Vec<String>),
}

/// Reads `bytes` as a sitemap, a sitemap index, or an RSS/RDF/Atom feed;
/// `None` when it is none of them (a page).
pub fn parse(bytes: &[u8]) -> Option<Listing> {
    let text = std::str::from_utf8(bytes).ok()?;
    let head = text.trim_start_matches('\u{feff}').trim_start();
    if !head.starts_with('<') {
        return None;
    }
    let doc = roxmltree::Document::parse_with_options(
        text,
        roxmltree::ParsingOptions {
            allow_dtd: true,
            ..Default::default()
        },
    )
    .ok()?;
    let root = doc.root_element();
    let named = |n: &roxmltree::Node, name: &str| n.is_element() && n.tag_name().name() == name;
    let texts = |parent: &str, child: &str| -> Vec<String> {
        root.descendants()
            .filter(|n| named(n, parent))
            .filter_map(|n| n.children().find(|c| named(c, child)))
            .filter_map(|c| c.text())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect()
    };
    match root.tag_name().name() {
        "urlset" => Some(Listing::Sitemap(texts("url", "loc"))),
        "sitemapindex" => Some(Listing::SitemapIndex(texts("sitemap", "loc"))),
        // RSS 2.0 (`rss/channel/item/link`) and RSS 1.0 (`rdf:RDF/item/link`).
        "rss" | "RDF" => Some(Listing::Feed(texts("item", "link"))),
        // Atom: each entry's `link` with `rel="alternate"` (or no rel).
        "feed" => Some(Listing::Feed(
            root.descendants()
                .filter(|n| named(n, "entry"))
                .filter_map(|e| {
                    e.children()
                        .filter(|c| named(c, "link"))
                        .find(|l| l.attribute("rel").is_none_or(|r| r == "alternate"))
                        .and_then(|l| l.attribute("href"))
                        .map(str::to_string)
                })
                .collect(),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sitemaps_and_feeds_are_read_and_pages_are_not() {
        let sitemap = br#"<?xml version="1.0" encoding="UTF-8"?>
            <urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">
              <url><loc> https://a.example/1 </loc><lastmod>2026-01-01</lastmod></url>
              <url><loc>https://a.example/2</loc></url>
            </urlset>"#;
        assert_eq!(
            parse(sitemap),
            Some(Listing::Sitemap(vec![
                "https://a.example/1".into(),
                "https://a.example/2".into()
            ]))
        );
        let index = br#"<sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">
            <sitemap><loc>https://a.example/s1.xml</loc></sitemap></sitemapindex>"#;
        assert_eq!(
            parse(index),
            Some(Listing::SitemapIndex(vec![
                "https://a.example/s1.xml".into()
            ]))
        );
        let rss = br#"<rss version="2.0"><channel><title>t</title><link>https://a.example/</link>
            <item><title>x</title><link>https://a.example/news/1</link></item>
            <item><title>y</title><link>https://a.example/news/2</link></item></channel></rss>"#;
        assert_eq!(
            parse(rss),
            Some(Listing::Feed(vec![
                "https://a.example/news/1".into(),
                "https://a.example/news/2".into()
            ]))
        );
        let atom = br#"<feed xmlns="http://www.w3.org/2005/Atom"><title>t</title>
            <link href="https://a.example/" rel="self"/>
            <entry><link rel="enclosure" href="https://a.example/x.mp3"/><link href="https://a.example/e1"/></entry>
            <entry><link rel="alternate" href="https://a.example/e2"/></entry></feed>"#;
        assert_eq!(
            parse(atom),
            Some(Listing::Feed(vec![
                "https://a.example/e1".into(),
                "https://a.example/e2".into()
            ]))
        );
        assert_eq!(parse(b"<!doctype html><html><body>hi</body></html>"), None);
        assert_eq!(parse(b"just text"), None);
        assert_eq!(parse(b"<html><p>unclosed</html>"), None);
    }

    #[test]
    fn a_folder_lists_readable_files_without_hidden_ones_or_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("sub/.git")).unwrap();
        std::fs::write(root.join("a.md"), "a").unwrap();
        std::fs::write(root.join("sub/b.TXT"), "b").unwrap();
        std::fs::write(root.join("sub/.git/c.txt"), "c").unwrap();
        std::fs::write(root.join(".hidden.md"), "h").unwrap();
        std::fs::write(root.join("image.png"), [0u8, 1]).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink("/etc/hostname", root.join("link.txt")).unwrap();
        let (files, more) = folder(root, 100).unwrap();
        assert!(!more);
        let names: Vec<&str> = files.iter().map(|f| f.relative.as_str()).collect();
        assert_eq!(names, ["a.md", "sub/b.TXT"]);
        assert_eq!(files[0].size, 1);
        let (one, more) = folder(root, 1).unwrap();
        assert_eq!((one.len(), more), (1, true));
        assert!(folder(&root.join("missing"), 10).is_err());
    }
}
