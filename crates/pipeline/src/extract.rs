//! Ingest stage: text from uploaded files — plain text, Markdown, HTML, PDF,
//! DOCX and ODT.
//!
//! The kind is decided from the bytes first (PDF magic, a zip archive holding
//! a word-processor document, HTML markup, NUL bytes and invalid UTF-8 for
//! binaries), then from the declared content type and the file name, so a
//! misnamed file is still read right and a binary renamed to `.txt` is refused
//! rather than indexed as garbage. The title comes from the document where it
//! has one (`<title>`, the first Markdown heading, the PDF's Title entry, the
//! DOCX or ODT title or first heading), else from the file name.

use scraper::{Html, Node, Selector};

mod office;

/// The formats ragd reads, for error messages.
const SUPPORTED: &str = "text, Markdown, HTML, PDF, DOCX and ODT";

/// Why a file's text cannot be read; the message is shown to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    /// Named or declared as PDF without being one.
    #[error("declared as PDF but is not a PDF file")]
    NotPdf,
    /// Named or declared as DOCX or ODT without being a zip archive.
    #[error("declared as {0} but is not a {0} file")]
    NotOffice(&'static str),
    /// NUL bytes (or an archive that is not a DOCX or ODT document): not a
    /// format ragd reads.
    #[error("binary file: only {SUPPORTED} files are supported")]
    Binary,
    /// Neither UTF-8 nor a known binary format.
    #[error("not UTF-8 text: only {SUPPORTED} files are supported")]
    NotUtf8,
    /// Nothing but white space.
    #[error("the file contains no text")]
    Empty,
    /// The PDF parser gave up.
    #[error("unreadable PDF{0}")]
    UnreadablePdf(String),
    /// A DOCX or ODT archive that cannot be read.
    #[error("unreadable DOCX or ODT document{0}")]
    UnreadableOffice(String),
    /// A PDF of images only.
    #[error("the PDF has no text layer (scanned pages are not supported)")]
    NoTextLayer,
}

/// A file's extracted text.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    /// The detected kind: `text`, `markdown`, `html`, `pdf`, `docx` or `odt`.
    pub kind: &'static str,
    /// The title, if the document has one.
    pub title: Option<String>,
    /// The text.
    pub text: String,
}

/// Detects the kind of `bytes` and extracts its text, or says why it cannot.
pub fn extract(
    name: &str,
    content_type: Option<&str>,
    bytes: &[u8],
) -> Result<Extracted, ExtractError> {
    let content_type = content_type.unwrap_or("").to_ascii_lowercase();
    let lower_name = name.to_ascii_lowercase();
    if bytes.starts_with(b"%PDF-") {
        return pdf(bytes);
    }
    if content_type.starts_with("application/pdf") || lower_name.ends_with(".pdf") {
        return Err(ExtractError::NotPdf);
    }
    if office::is_zip(bytes) {
        let out = office::extract(bytes)?;
        if out.text.trim().is_empty() {
            return Err(ExtractError::Empty);
        }
        return Ok(out);
    }
    if content_type.contains("wordprocessingml") || lower_name.ends_with(".docx") {
        return Err(ExtractError::NotOffice("DOCX"));
    }
    if content_type.contains("opendocument.text") || lower_name.ends_with(".odt") {
        return Err(ExtractError::NotOffice("ODT"));
    }
    let head = &bytes[..bytes.len().min(8192)];
    if head.contains(&0) {
        return Err(ExtractError::Binary);
    }
    let text = std::str::from_utf8(bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes))
        .map_err(|_| ExtractError::NotUtf8)?;
    let start = text
        .trim_start()
        .get(..15)
        .unwrap_or("")
        .to_ascii_lowercase();
    let looks_html = start.starts_with("<!doctype html") || start.starts_with("<html");
    let out = if looks_html
        || content_type.starts_with("text/html")
        || lower_name.ends_with(".html")
        || lower_name.ends_with(".htm")
    {
        html(text)
    } else if content_type.starts_with("text/markdown")
        || lower_name.ends_with(".md")
        || lower_name.ends_with(".markdown")
    {
        markdown(text)
    } else {
        Extracted {
            kind: "text",
            title: None,
            text: text.to_string(),
        }
    };
    if out.text.trim().is_empty() {
        return Err(ExtractError::Empty);
    }
    Ok(out)
}

fn markdown(text: &str) -> Extracted {
    let title = text
        .lines()
        .find_map(|l| l.strip_prefix("# ").map(|t| t.trim().to_string()))
        .filter(|t| !t.is_empty());
    Extracted {
        kind: "markdown",
        title,
        text: text.to_string(),
    }
}

/// Elements whose text is not content.
const SKIPPED: &[&str] = &["script", "style", "noscript", "template", "head", "svg"];
/// Elements that start a new line of text.
const BLOCKS: &[&str] = &[
    "p",
    "div",
    "section",
    "article",
    "header",
    "footer",
    "main",
    "aside",
    "nav",
    "li",
    "ul",
    "ol",
    "table",
    "tr",
    "br",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "pre",
    "blockquote",
    "dt",
    "dd",
    "figcaption",
    "hr",
];

fn html(source: &str) -> Extracted {
    let doc = Html::parse_document(source);
    let first = |sel: &str| {
        Selector::parse(sel).ok().and_then(|s| {
            doc.select(&s).next().map(|e| {
                e.text()
                    .collect::<String>()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
        })
    };
    let title = first("title")
        .or_else(|| first("h1"))
        .filter(|t| !t.is_empty());
    let mut out = String::new();
    let mut stack = vec![(doc.tree.root(), false)];
    // Depth-first walk; a block element's closing adds a line break.
    while let Some((node, closing)) = stack.pop() {
        match node.value() {
            Node::Element(e) => {
                let name = e.name();
                if SKIPPED.contains(&name) {
                    continue;
                }
                let block = BLOCKS.contains(&name);
                if closing {
                    if block && !out.ends_with('\n') {
                        out.push('\n');
                    }
                    continue;
                }
                if block && !out.is_empty() && !out.ends_with('\n') {
                    out.push('\n');
                }
                // Headings become Markdown headings, so the chunker knows the sections.
                if let Some(level) = heading_level(name) {
                    out.push_str(&"#".repeat(level));
                    out.push(' ');
                }
                stack.push((node, true));
                for child in node.children().rev() {
                    stack.push((child, false));
                }
            }
            Node::Text(t) if !closing => {
                let words = t.split_whitespace().collect::<Vec<_>>().join(" ");
                if !words.is_empty() {
                    if !out.is_empty() && !out.ends_with('\n') && t.starts_with(char::is_whitespace)
                    {
                        out.push(' ');
                    }
                    out.push_str(&words);
                    if t.ends_with(char::is_whitespace) {
                        out.push(' ');
                    }
                }
            }
            _ if !closing => {
                for child in node.children().rev() {
                    stack.push((child, false));
                }
            }
            _ => {}
        }
    }
    let mut text = String::with_capacity(out.len());
    for line in out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '#'))
    {
        let is_heading = line
            .split_once(' ')
            .is_some_and(|(marks, _)| heading_marks(marks));
        if !text.is_empty() {
            text.push_str(if is_heading || text.ends_with("\n\n") {
                "\n\n"
            } else {
                "\n"
            });
        }
        text.push_str(line);
        if is_heading {
            text.push('\n');
        }
    }
    let text = text.replace("\n\n\n", "\n\n").trim().to_string();
    Extracted {
        kind: "html",
        title,
        text,
    }
}

fn heading_level(name: &str) -> Option<usize> {
    match name {
        "h1" => Some(1),
        "h2" => Some(2),
        "h3" => Some(3),
        "h4" => Some(4),
        "h5" => Some(5),
        "h6" => Some(6),
        _ => None,
    }
}

fn heading_marks(s: &str) -> bool {
    (1..=6).contains(&s.len()) && s.chars().all(|c| c == '#')
}

/// Deepest page tree ragd follows (lopdf walks at most 256 levels down).
const PAGE_TREE_DEPTH: usize = 256;

/// A page whose chain of `/Parent` references loops or runs deeper than
/// [`PAGE_TREE_DEPTH`], if any. pdf-extract looks inherited attributes up
/// that chain (`get_inherited`, a recursion the optimiser turns into a loop)
/// without a bound: a page that is its own parent — a PDF of 843 bytes,
/// found by the `extract` fuzz target — kept a thread spinning forever.
fn parent_loop(doc: &pdf_extract::Document) -> Option<pdf_extract::ObjectId> {
    for page in doc.page_iter() {
        let mut seen = std::collections::HashSet::new();
        let mut at = Some(page);
        while let Some(id) = at {
            if !seen.insert(id) || seen.len() > PAGE_TREE_DEPTH {
                return Some(page);
            }
            at = doc
                .get_dictionary(id)
                .ok()
                .and_then(|d| d.get(b"Parent").ok())
                .and_then(|p| p.as_reference().ok());
        }
    }
    None
}

fn pdf(bytes: &[u8]) -> Result<Extracted, ExtractError> {
    // pdf-extract can panic on malformed files; a bad upload must not take the
    // request (or the server) down.
    let result = std::panic::catch_unwind(|| {
        let doc = pdf_extract::Document::load_mem(bytes)
            .map_err(|e| ExtractError::UnreadablePdf(format!(": {e}")))?;
        if let Some(page) = parent_loop(&doc) {
            return Err(ExtractError::UnreadablePdf(format!(
                ": the page tree loops (page object {} is its own ancestor)",
                page.0
            )));
        }
        let text = pdf_extract::extract_text_from_mem(bytes)
            .map_err(|e| ExtractError::UnreadablePdf(format!(": {e}")))?;
        let title = Some(doc).and_then(|doc| {
            let info = doc.trailer.get(b"Info").ok()?.as_reference().ok()?;
            let title = doc
                .get_object(info)
                .ok()?
                .as_dict()
                .ok()?
                .get(b"Title")
                .ok()?
                .as_str()
                .ok()?;
            Some(String::from_utf8_lossy(title).trim().to_string()).filter(|t| !t.is_empty())
        });
        Ok::<_, ExtractError>((text, title))
    });
    let (text, title) = result.map_err(|_| ExtractError::UnreadablePdf(String::new()))??;
    let text = text
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_string();
    if text.is_empty() {
        return Err(ExtractError::NoTextLayer);
    }
    Ok(Extracted {
        kind: "pdf",
        title,
        text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_drops_scripts_and_styles_and_keeps_blocks() {
        let src = "<!DOCTYPE html><html><head><title> The  Title </title><style>p{}</style></head>\
                   <body><script>var secret = 1;</script><h1>Heading</h1><p>First <b>bold</b> para.</p>\
                   <ul><li>one</li><li>two</li></ul></body></html>";
        let e = extract("page.txt", None, src.as_bytes()).unwrap();
        assert_eq!(e.kind, "html", "detected from the content, not the name");
        assert_eq!(e.title.as_deref(), Some("The Title"));
        assert_eq!(e.text, "# Heading\n\nFirst bold para.\none\ntwo");
        assert!(!e.text.contains("secret"));
    }

    #[test]
    fn markdown_title_and_plain_text() {
        let e = extract("notes.md", None, b"Intro\n# Main Title\nBody text").unwrap();
        assert_eq!(
            (e.kind, e.title.as_deref()),
            ("markdown", Some("Main Title"))
        );
        let e = extract("notes", Some("text/plain"), "plain 中文".as_bytes()).unwrap();
        assert_eq!((e.kind, e.text.as_str()), ("text", "plain 中文"));
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        std::fs::read(path.join(name)).unwrap()
    }

    /// A DOCX made by python-docx (Word's default template): title from the
    /// document properties, headings by style (Title, Heading 1, Heading 2),
    /// runs joined, table cells and escaped characters kept.
    #[test]
    fn docx_text_and_headings() {
        let e = extract("g.bin", None, &fixture("greenhouse.docx")).unwrap();
        assert_eq!(
            (e.kind, e.title.as_deref()),
            ("docx", Some("Greenhouse Handbook"))
        );
        assert_eq!(
            e.text,
            "# Greenhouse Handbook\n\nA greenhouse keeps plants warm through the winter months.\n\n\
             # Ventilation\n\nOpen the roof vents when the air inside rises above 27 degrees Celsius.\n\n\
             ## Watering\n\nWater tomatoes at the base of the stem, never on the leaves.\n\n\
             Basil\n\nNeeds full sun.\n\nTiles & glass < 5 mm thick crack in frost."
        );
    }

    /// An ODT made by odfpy: outline levels, spaces (`text:s`), spans, line
    /// breaks and Chinese text.
    #[test]
    fn odt_text_and_headings() {
        let e = extract("notes.odt", None, &fixture("beekeeping.odt")).unwrap();
        assert_eq!(
            (e.kind, e.title.as_deref()),
            ("odt", Some("Beekeeping Notes"))
        );
        assert_eq!(
            e.text,
            "# Beekeeping Notes\n\nHoney bees collect nectar from flowers within three kilometres of the hive.\n\n\
             ## Swarming\n\nA colony swarms in late spring when the old queen leaves with half the workers.\n\n\
             Smoke calms the bees\nbefore the hive is opened.\n\n中文段落：蜜蜂在春天分蜂。"
        );
    }

    /// A zip archive built here, member by member.
    fn archive(members: &[(&str, &str)]) -> Vec<u8> {
        use std::io::Write;
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for (name, body) in members {
            zip.start_file(*name, zip::write::SimpleFileOptions::default())
                .unwrap();
            zip.write_all(body.as_bytes()).unwrap();
        }
        zip.finish().unwrap().into_inner()
    }

    const W: &str = "xmlns:w=\"http://schemas.openxmlformats.org/wordprocessingml/2006/main\"";

    /// Heading styles found by their names in styles.xml (a German Word's
    /// style ids), an outline level set on the paragraph, deleted text left
    /// out; a document with no text, a damaged archive, another kind of
    /// archive, a DTD and a misnamed file are each refused with the reason.
    #[test]
    fn office_edge_cases() {
        let styles = format!(
            "<w:styles {W}><w:style w:type=\"paragraph\" w:styleId=\"berschrift1\">\
             <w:name w:val=\"heading 1\"/></w:style></w:styles>"
        );
        let body = format!(
            "<w:document {W}><w:body>\
             <w:p><w:pPr><w:pStyle w:val=\"berschrift1\"/></w:pPr><w:r><w:t>Einleitung</w:t></w:r></w:p>\
             <w:p><w:r><w:t xml:space=\"preserve\">Kept </w:t></w:r><w:del><w:r><w:delText>gone</w:delText></w:r></w:del><w:r><w:t>text</w:t></w:r></w:p>\
             <w:p><w:pPr><w:outlineLvl w:val=\"2\"/></w:pPr><w:r><w:t>Deep</w:t></w:r></w:p>\
             </w:body></w:document>"
        );
        let docx = archive(&[("word/document.xml", &body), ("word/styles.xml", &styles)]);
        let e = extract("x.docx", None, &docx).unwrap();
        assert_eq!(e.text, "# Einleitung\n\nKept text\n\n### Deep");
        assert_eq!(e.title.as_deref(), Some("Einleitung"), "the first heading");

        let empty = archive(&[(
            "word/document.xml",
            &format!("<w:document {W}><w:body><w:p/></w:body></w:document>"),
        )]);
        assert_eq!(extract("e.docx", None, &empty), Err(ExtractError::Empty));
        let cut = &docx[..docx.len() / 2];
        assert!(matches!(
            extract("cut.docx", None, cut),
            Err(ExtractError::UnreadableOffice(_))
        ));
        let other = archive(&[("data.csv", "a,b\n1,2\n")]);
        assert_eq!(extract("data.zip", None, &other), Err(ExtractError::Binary));
        let dtd = archive(&[(
            "word/document.xml",
            "<!DOCTYPE d [<!ENTITY a \"aaaa\">]><d>&a;</d>",
        )]);
        assert!(matches!(
            extract("dtd.docx", None, &dtd),
            Err(ExtractError::UnreadableOffice(_))
        ));
        assert_eq!(
            extract("notes.docx", None, b"just text"),
            Err(ExtractError::NotOffice("DOCX"))
        );
        assert_eq!(
            extract(
                "notes",
                Some("application/vnd.oasis.opendocument.text"),
                b"just text"
            ),
            Err(ExtractError::NotOffice("ODT"))
        );
    }

    /// A page that is its own parent (the fixture with one reference
    /// changed, as the fuzzer found it): refused at once instead of looping
    /// forever in pdf-extract's inherited-attribute lookup.
    #[test]
    fn a_pdf_whose_page_tree_loops_is_refused() {
        let pdf = fixture("lighthouse.pdf");
        let at = pdf
            .windows(13)
            .position(|w| w == b"/Parent 2 0 R")
            .expect("the fixture's page names its parent");
        let mut looped = pdf.clone();
        looped[at..at + 13].copy_from_slice(b"/Parent 3 0 R");
        match extract("loop.pdf", None, &looped) {
            Err(ExtractError::UnreadablePdf(why)) => assert!(why.contains("loops"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(extract("ok.pdf", None, &pdf).is_ok());
    }

    /// A one-page PDF with a text layer and a Title, made with lopdf.
    pub(crate) fn tiny_pdf(title: &str, lines: &[&str]) -> Vec<u8> {
        use pdf_extract::content::{Content, Operation};
        use pdf_extract::{Dictionary, Document, Object, Stream};
        let name = |n: &str| Object::Name(n.as_bytes().to_vec());
        let mut doc = Document::with_version("1.5");
        let pages_id = doc.new_object_id();
        let mut font = Dictionary::new();
        font.set("Type", name("Font"));
        font.set("Subtype", name("Type1"));
        font.set("BaseFont", name("Helvetica"));
        let font_id = doc.add_object(font);
        let mut ops = vec![
            Operation::new("BT", vec![]),
            Operation::new("Tf", vec![name("F1"), 12.into()]),
        ];
        for (i, line) in lines.iter().enumerate() {
            let td = if i == 0 {
                vec![72.into(), 720.into()]
            } else {
                vec![0.into(), (-16).into()]
            };
            ops.push(Operation::new("Td", td));
            ops.push(Operation::new("Tj", vec![Object::string_literal(*line)]));
        }
        ops.push(Operation::new("ET", vec![]));
        let content_id = doc.add_object(Stream::new(
            Dictionary::new(),
            Content { operations: ops }.encode().unwrap(),
        ));
        let mut page = Dictionary::new();
        page.set("Type", name("Page"));
        page.set("Parent", pages_id);
        page.set("Contents", content_id);
        let page_id = doc.add_object(page);
        let mut fonts = Dictionary::new();
        fonts.set("F1", font_id);
        let mut resources = Dictionary::new();
        resources.set("Font", fonts);
        let mut pages = Dictionary::new();
        pages.set("Type", name("Pages"));
        pages.set("Kids", vec![page_id.into()]);
        pages.set("Count", 1);
        pages.set("Resources", resources);
        pages.set("MediaBox", vec![0.into(), 0.into(), 612.into(), 792.into()]);
        doc.objects.insert(pages_id, Object::Dictionary(pages));
        let mut catalog = Dictionary::new();
        catalog.set("Type", name("Catalog"));
        catalog.set("Pages", pages_id);
        let catalog_id = doc.add_object(catalog);
        let mut info = Dictionary::new();
        info.set("Title", Object::string_literal(title));
        let info_id = doc.add_object(info);
        doc.trailer.set("Root", catalog_id);
        doc.trailer.set("Info", info_id);
        let mut out = Vec::new();
        doc.save_to(&mut out).unwrap();
        out
    }

    #[test]
    fn pdf_text_layer_and_title() {
        let bytes = tiny_pdf(
            "Quarterly Report",
            &["Revenue grew by twelve percent.", "Costs were flat."],
        );
        let e = extract("upload.bin", Some("application/octet-stream"), &bytes).unwrap();
        assert_eq!(e.kind, "pdf");
        assert_eq!(e.title.as_deref(), Some("Quarterly Report"));
        assert!(
            e.text.contains("Revenue grew by twelve percent."),
            "{:?}",
            e.text
        );
        assert!(e.text.contains("Costs were flat."), "{:?}", e.text);
        // Truncated: a per-file error, not a panic.
        assert!(extract("cut.pdf", None, &bytes[..bytes.len() / 2]).is_err());
    }

    #[test]
    fn binaries_bad_pdfs_and_empty_files_are_refused() {
        assert!(extract("a.txt", None, b"\x7fELF\x02\x01\x00\x00")
            .unwrap_err()
            .to_string()
            .contains("binary"));
        assert!(extract("a.txt", None, &[0xC3, 0x28, b'a'])
            .unwrap_err()
            .to_string()
            .contains("UTF-8"));
        assert!(extract("a.pdf", None, b"%PDF-1.4\ngarbage")
            .unwrap_err()
            .to_string()
            .contains("PDF"));
        assert!(extract("a.pdf", None, b"not a pdf")
            .unwrap_err()
            .to_string()
            .contains("not a PDF"));
        assert!(extract("a.txt", None, b"   \n")
            .unwrap_err()
            .to_string()
            .contains("no text"));
    }
}
