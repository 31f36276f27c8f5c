//! Word-processor files: DOCX (Office Open XML) and ODT (OpenDocument Text).
//!
//! Both are zip archives whose body is one XML part (`word/document.xml`,
//! `content.xml`); its paragraphs become lines and its headings Markdown
//! headings, so the chunker knows the sections as it does for HTML. The
//! archive is read with `zip` and the XML with `roxmltree` (both well kept);
//! what ragd writes here is only the walk over the two vocabularies: the
//! crates that model whole documents (docx-rs and the like) are made for
//! writing them, and pull in far more than the text and headings ingest
//! needs.
//!
//! Limits, so that a hostile archive cannot exhaust memory: each XML part is
//! read up to [`MAX_PART`] bytes uncompressed (a larger one is refused, not
//! cut), and the archive must hold its body part under the usual name.

use std::collections::HashMap;
use std::io::{Cursor, Read};

use roxmltree::{Document, Node, ParsingOptions};

use super::{ExtractError, Extracted};

/// The most bytes one XML part of a document may hold once decompressed.
const MAX_PART: u64 = 64 << 20;

/// The office formats, told apart by the archive's members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    Docx,
    Odt,
}

/// Whether `bytes` is a zip archive (the local file header's magic).
pub(super) fn is_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04")
}

/// Extracts a DOCX or ODT file's text and title; another zip archive (or a
/// damaged one) is refused with the reason.
pub(super) fn extract(bytes: &[u8]) -> Result<Extracted, ExtractError> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| ExtractError::UnreadableOffice(format!(": {e}")))?;
    let format = if zip.index_for_name("word/document.xml").is_some() {
        Format::Docx
    } else if read_part(&mut zip, "mimetype")?
        .is_some_and(|m| m.trim() == "application/vnd.oasis.opendocument.text")
        || zip.index_for_name("content.xml").is_some()
            && zip.index_for_name("META-INF/manifest.xml").is_some()
    {
        Format::Odt
    } else {
        return Err(ExtractError::Binary);
    };
    let (body_name, meta_name) = match format {
        Format::Docx => ("word/document.xml", "docProps/core.xml"),
        Format::Odt => ("content.xml", "meta.xml"),
    };
    let body = read_part(&mut zip, body_name)?
        .ok_or_else(|| ExtractError::UnreadableOffice(format!(": no {body_name}")))?;
    let body = parse(&body, body_name)?;
    let (text, first_heading) = match format {
        Format::Docx => {
            let styles = match read_part(&mut zip, "word/styles.xml")? {
                Some(xml) => docx_heading_styles(&parse(&xml, "word/styles.xml")?),
                None => HashMap::new(),
            };
            docx_text(&body, &styles)
        }
        Format::Odt => odt_text(&body),
    };
    // The title the author set (Dublin Core's `dc:title`, in both formats),
    // else the first heading.
    let title = match read_part(&mut zip, meta_name)? {
        Some(xml) => parse(&xml, meta_name)?
            .descendants()
            .find(|n| n.has_tag_name("title") && n.tag_name().namespace() == Some(DC))
            .map(|n| words(&all_text(n)))
            .filter(|t| !t.is_empty()),
        None => None,
    }
    .or(first_heading);
    let kind = match format {
        Format::Docx => "docx",
        Format::Odt => "odt",
    };
    Ok(Extracted { kind, title, text })
}

/// Dublin Core's namespace, where both formats keep the title.
const DC: &str = "http://purl.org/dc/elements/1.1/";

/// The member `name` as text, or `None` when the archive has no such member.
fn read_part(
    zip: &mut zip::ZipArchive<Cursor<&[u8]>>,
    name: &str,
) -> Result<Option<String>, ExtractError> {
    let unreadable =
        |e: &dyn std::fmt::Display| ExtractError::UnreadableOffice(format!(": {name}: {e}"));
    let mut file = match zip.by_name(name) {
        Ok(f) => f,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(unreadable(&e)),
    };
    let mut bytes = Vec::new();
    // One byte past the limit tells a part at the limit from a larger one.
    (&mut file)
        .take(MAX_PART + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| unreadable(&e))?;
    if bytes.len() as u64 > MAX_PART {
        return Err(ExtractError::UnreadableOffice(format!(
            ": {name} is larger than {} MB uncompressed",
            MAX_PART >> 20
        )));
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| unreadable(&"not UTF-8"))
}

fn parse<'a>(xml: &'a str, name: &str) -> Result<Document<'a>, ExtractError> {
    // No DTDs: a document part has none, and entity expansion is a way to
    // blow up memory.
    Document::parse_with_options(
        xml,
        ParsingOptions {
            allow_dtd: false,
            ..ParsingOptions::default()
        },
    )
    .map_err(|e| ExtractError::UnreadableOffice(format!(": {name}: {e}")))
}

/// White space runs as single spaces, trimmed.
fn words(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn all_text(node: Node) -> String {
    node.descendants()
        .filter(|n| n.is_text())
        .filter_map(|n| n.text())
        .collect()
}

/// Appends a paragraph to `out`: a Markdown heading at `level`, or a plain
/// line; empty paragraphs are left out. Returns the heading's text when it is one.
fn push_paragraph(out: &mut String, text: &str, level: Option<usize>) -> Option<String> {
    let text = text
        .lines()
        .map(words)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    if text.is_empty() {
        return None;
    }
    if !out.is_empty() {
        out.push_str("\n\n");
    }
    match level {
        Some(level) => {
            let heading = text.replace('\n', " ");
            out.push_str(&"#".repeat(level.clamp(1, 6)));
            out.push(' ');
            out.push_str(&heading);
            Some(heading)
        }
        None => {
            out.push_str(&text);
            None
        }
    }
}

// DOCX: WordprocessingML, `w:` = the main namespace.

/// Style id → heading level, from `word/styles.xml`: a paragraph style whose
/// name is "heading N" or "Title" (the names are English whatever the
/// language of the interface; the ids are not: "berschrift1" in German
/// Word), or that sets an outline level.
fn docx_heading_styles(styles: &Document) -> HashMap<String, usize> {
    let mut levels = HashMap::new();
    for style in styles.descendants().filter(|n| n.has_tag_name("style")) {
        let Some(id) = w_attr(style, "styleId") else {
            continue;
        };
        let name = style
            .children()
            .find(|n| n.has_tag_name("name"))
            .and_then(|n| w_attr(n, "val"))
            .unwrap_or("")
            .to_ascii_lowercase();
        let level = if name == "title" {
            Some(1)
        } else if let Some(n) = name.strip_prefix("heading ") {
            n.trim().parse::<usize>().ok()
        } else {
            outline_level(style)
        };
        if let Some(level) = level {
            levels.insert(id.to_string(), level);
        }
    }
    levels
}

/// An attribute in any namespace by its local name (`w:val` → `val`).
fn w_attr<'a>(node: Node<'a, '_>, name: &str) -> Option<&'a str> {
    node.attributes()
        .find(|a| a.name() == name)
        .map(|a| a.value())
}

/// `w:pPr/w:outlineLvl/@w:val` (0-based) as a heading level (1-based); 9 is
/// "body text".
fn outline_level(node: Node) -> Option<usize> {
    let ppr = node.children().find(|n| n.has_tag_name("pPr"))?;
    let lvl = ppr.children().find(|n| n.has_tag_name("outlineLvl"))?;
    let n: usize = w_attr(lvl, "val")?.parse().ok()?;
    (n < 9).then_some(n + 1)
}

/// The body's paragraphs in order (also those in tables and text boxes), and
/// the first heading's text.
fn docx_text(doc: &Document, styles: &HashMap<String, usize>) -> (String, Option<String>) {
    let mut out = String::new();
    let mut first_heading = None;
    let Some(body) = doc.descendants().find(|n| n.has_tag_name("body")) else {
        return (out, None);
    };
    // A paragraph inside another's text box is walked as its own paragraph
    // too; its text is not repeated in the outer one (`run_text` stops at
    // nested paragraphs).
    for p in body.descendants().filter(|n| n.has_tag_name("p")) {
        let level = p
            .children()
            .find(|n| n.has_tag_name("pPr"))
            .and_then(|ppr| {
                ppr.children()
                    .find(|n| n.has_tag_name("pStyle"))
                    .and_then(|s| w_attr(s, "val"))
                    .and_then(|id| styles.get(id).copied())
                    .or_else(|| outline_level(p))
            });
        let mut text = String::new();
        docx_runs(p, &mut text);
        if let Some(h) = push_paragraph(&mut out, &text, level) {
            first_heading.get_or_insert(h);
        }
    }
    (out, first_heading)
}

/// The text of a paragraph's runs: `w:t`, tabs and breaks; deleted text
/// (`w:delText`), field codes (`w:instrText`) and nested paragraphs are not
/// this paragraph's text.
fn docx_runs(node: Node, out: &mut String) {
    for child in node.children().filter(|n| n.is_element()) {
        match child.tag_name().name() {
            "t" => out.push_str(child.text().unwrap_or("")),
            "tab" => out.push('\t'),
            "br" | "cr" => out.push('\n'),
            "p" | "delText" | "instrText" | "pPr" | "rPr" => {}
            _ => docx_runs(child, out),
        }
    }
}

// ODT: OpenDocument, `text:` = its text namespace.

/// The document's paragraphs (`text:p`) and headings (`text:h`, with their
/// outline level) in order, and the first heading's text.
fn odt_text(doc: &Document) -> (String, Option<String>) {
    let mut out = String::new();
    let mut first_heading = None;
    let Some(body) = doc.descendants().find(|n| {
        n.has_tag_name("text") && n.parent_element().is_some_and(|p| p.has_tag_name("body"))
    }) else {
        return (out, None);
    };
    for p in body
        .descendants()
        .filter(|n| n.has_tag_name("p") || n.has_tag_name("h"))
    {
        let level = p.has_tag_name("h").then(|| {
            w_attr(p, "outline-level")
                .and_then(|l| l.parse().ok())
                .unwrap_or(1)
        });
        let mut text = String::new();
        odt_spans(p, &mut text);
        if let Some(h) = push_paragraph(&mut out, &text, level) {
            first_heading.get_or_insert(h);
        }
    }
    (out, first_heading)
}

/// A paragraph's text: its text nodes and spans, `text:s` (runs of spaces),
/// tabs and line breaks; notes, annotations and nested paragraphs are not
/// this paragraph's text.
fn odt_spans(node: Node, out: &mut String) {
    for child in node.children() {
        if child.is_text() {
            out.push_str(child.text().unwrap_or(""));
            continue;
        }
        if !child.is_element() {
            continue;
        }
        match child.tag_name().name() {
            "s" => {
                let n = w_attr(child, "c")
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(1usize);
                out.push_str(&" ".repeat(n.min(64)));
            }
            "tab" => out.push('\t'),
            "line-break" => out.push('\n'),
            "p" | "h" | "note" | "annotation" | "annotation-end" | "tracked-changes" => {}
            _ => odt_spans(child, out),
        }
    }
}
