//! The language of a question or an answer, what ragd says in it when the
//! documents do not hold the answer, and whether a model's answer is itself a
//! refusal.
//!
//! Detection is whatlang's (trigram models for 69 languages); text written
//! mostly in Han characters is Chinese whatever whatlang guesses, since short
//! Chinese questions are where its language guess is least sure and the script
//! alone settles it. Text too short or too mixed to tell is English, the
//! language of the instructions.

use serde::{Deserialize, Serialize};
use whatlang::{Lang as WLang, Script};

/// A language, by ISO 639-1 code where ragd has words for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    /// English (also the fallback).
    En,
    /// Chinese.
    Zh,
    /// German.
    De,
    /// French.
    Fr,
    /// Spanish.
    Es,
    /// Japanese.
    Ja,
}

impl Lang {
    /// The ISO 639-1 code.
    pub fn code(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::Zh => "zh",
            Lang::De => "de",
            Lang::Fr => "fr",
            Lang::Es => "es",
            Lang::Ja => "ja",
        }
    }

    /// The language's name in English, for the prompt ("Write the answer in …").
    pub fn name(self) -> &'static str {
        match self {
            Lang::En => "English",
            Lang::Zh => "Chinese (简体中文)",
            Lang::De => "German",
            Lang::Fr => "French",
            Lang::Es => "Spanish",
            Lang::Ja => "Japanese",
        }
    }

    /// "The documents do not contain the answer", in this language.
    pub fn not_in_documents(self) -> &'static str {
        match self {
            Lang::En => "The documents do not contain the answer to this question.",
            Lang::Zh => "文档中没有这个问题的答案。",
            Lang::De => "Die Dokumente enthalten keine Antwort auf diese Frage.",
            Lang::Fr => "Les documents ne contiennent pas la réponse à cette question.",
            Lang::Es => "Los documentos no contienen la respuesta a esta pregunta.",
            Lang::Ja => "資料にはこの質問の答えが含まれていません。",
        }
    }
}

/// The language `text` is written in.
pub fn detect(text: &str) -> Lang {
    let letters: Vec<char> = text.chars().filter(|c| c.is_alphabetic()).collect();
    if letters.is_empty() {
        return Lang::En;
    }
    let kana = letters
        .iter()
        .filter(|&&c| matches!(c as u32, 0x3040..=0x30FF))
        .count();
    let han = letters.iter().filter(|&&c| is_han(c)).count();
    if kana * 10 >= letters.len() {
        return Lang::Ja;
    }
    // A Han character carries about as much as a short Latin word.
    if han > 0 && han * 3 >= letters.len() - han {
        return Lang::Zh;
    }
    if reads_as_english(text) {
        return Lang::En;
    }
    let Some(info) = whatlang::detect(text) else {
        return Lang::En;
    };
    if info.script() == Script::Mandarin {
        return Lang::Zh;
    }
    // Short Latin-script text is often misread; trust only a confident guess.
    if !info.is_reliable() && letters.len() < 40 {
        return Lang::En;
    }
    match info.lang() {
        WLang::Cmn => Lang::Zh,
        WLang::Deu => Lang::De,
        WLang::Fra => Lang::Fr,
        WLang::Spa => Lang::Es,
        WLang::Jpn => Lang::Ja,
        _ => Lang::En,
    }
}

/// English function words that the other languages ragd answers in do not
/// use as words of their own ("in", "an", "was", "will", "no", "a" and "on" are
/// left out: German, French or Spanish have them too).
const ENGLISH_MARKERS: &[&str] = &[
    "the", "and", "is", "are", "what", "how", "which", "who", "why", "when", "where", "can",
    "does", "do", "that", "this", "with", "i", "you", "it", "of", "to", "my", "should", "there",
    "their", "these", "they", "would", "could", "from", "your",
];

/// Whether `text` is plainly English by its function words: at least two of
/// them, and a fifth of its words. whatlang's trigrams read technical English
/// full of names as German or French (2 of the Debian FAQ's 123 questions,
/// "How can I check that I am using a Debian system…" among them), and the
/// model was then asked to answer in that language.
fn reads_as_english(text: &str) -> bool {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let english = words
        .iter()
        .filter(|w| ENGLISH_MARKERS.contains(&w.as_str()))
        .count();
    english >= 2 && english * 5 >= words.len()
}

fn is_han(c: char) -> bool {
    matches!(c as u32, 0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0xF900..=0xFAFF)
}

/// Whether a model's answer says that the passages do not answer the question
/// (the instruction asks it to say so), rather than answering.
pub fn is_refusal(answer: &str) -> bool {
    let a = answer.to_lowercase();
    // Only the start counts: "I don't know X, but Y [1]" answers.
    let head: String = a.chars().take(160).collect();
    const EN: [&str; 12] = [
        "i don't know",
        "i do not know",
        "i don’t know",
        "do not contain",
        "does not contain",
        "don't contain",
        "doesn't contain",
        "no information",
        "not mentioned",
        "cannot answer",
        "can't answer",
        "not provided in the passages",
    ];
    const ZH: [&str; 8] = [
        "不知道",
        "没有提到",
        "没有提供",
        "不包含",
        "没有包含",
        "无法回答",
        "没有相关信息",
        "没有这个问题的答案",
    ];
    EN.iter().any(|p| head.contains(p)) || ZH.iter().any(|p| head.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_the_languages_it_answers_in() {
        assert_eq!(detect("What is the latest version of Debian?"), Lang::En);
        assert_eq!(detect("Debian 的最新版本是什么？"), Lang::Zh);
        assert_eq!(detect("怎么安装软件包"), Lang::Zh);
        assert_eq!(detect("Wie installiere ich ein Paket unter Debian, wenn ich keine Internetverbindung habe?"), Lang::De);
        assert_eq!(
            detect("Comment installer un paquet sur Debian sans connexion à Internet ?"),
            Lang::Fr
        );
        assert_eq!(
            detect("パッケージをインストールするにはどうすればいいですか"),
            Lang::Ja
        );
        // Nothing to go on: English.
        // Technical English that trigrams read as German or French.
        assert_eq!(
            detect("How can I check that I am using a Debian system, and what version it is?"),
            Lang::En
        );
        assert_eq!(
            detect("How can I find out what package produced a particular file?"),
            Lang::En
        );
        assert_eq!(
            detect("¿Cómo instalo un paquete en Debian sin conexión a Internet?"),
            Lang::Es
        );
        assert_eq!(
            detect(
                "Was ist ein Paket, und wie installiere ich es auf meinem Rechner ohne Internet?"
            ),
            Lang::De
        );
        assert_eq!(detect("42?"), Lang::En);
        assert_eq!(detect(""), Lang::En);
        // A Chinese sentence with an English product name is still Chinese.
        assert_eq!(detect("如何在 Debian 上安装 nginx？"), Lang::Zh);
    }

    #[test]
    fn refusals_are_recognised_only_at_the_start() {
        assert!(is_refusal("I don't know. The passages do not say."));
        assert!(is_refusal(
            "The passages do not contain the answer to this question."
        ));
        assert!(is_refusal("文档中没有提到这个问题。"));
        assert!(!is_refusal("Debian is a free operating system [1]."));
        let long = format!(
            "{} Nothing here is not mentioned.",
            "Debian is free software. ".repeat(10)
        );
        assert!(!is_refusal(&long));
    }
}
