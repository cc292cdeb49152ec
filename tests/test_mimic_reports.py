"""MIMIC-CXR report text: the official section extraction and the R2Gen cleaning (DATASETS.md 1b, C),
on reports written to exercise each rule."""

from m4cxr.data.sources.mimic_reports import clean_report, findings_section, normalise_section_name, split_sections


def report(*lines: str) -> str:
    return "\n".join(lines) + "\n"


def test_headers_split_sections_after_a_preamble():
    text = report(" FINAL REPORT", " EXAMINATION:  CHEST (PA AND LAT)", " ", " INDICATION:  ___ with cough", " ",
                  " FINDINGS:", " ", " The lungs are clear.", " ", " IMPRESSION:", " ", " No acute process.")
    names = [name for name, _ in split_sections(text)]
    assert names == ["preamble", "examination", "indication", "findings", "impression"]
    assert findings_section(text) == "The lungs are clear."


def test_a_report_without_headers_is_one_section():
    assert split_sections("The lungs are clear.") == [("full report", "The lungs are clear.")]
    assert findings_section("The lungs are clear.") is None


def test_the_next_header_is_searched_only_after_the_first_newline():
    # FINDINGS: is followed by a newline, which its own pattern consumes; the search for the next
    # header starts after the next newline, so the IMPRESSION header right below is not a boundary.
    text = report(" FINAL REPORT", " FINDINGS:", " IMPRESSION: No acute process.", " Heart is normal.")
    assert findings_section(text) == "IMPRESSION: No acute process.\n Heart is normal."


def test_header_names_are_normalised_in_order():
    assert normalise_section_name("FINDNGS") == "findings"  # exact table: a misspelling
    assert normalise_section_name("CHEST, TWO VIEWS") == "findings"  # exact table
    assert normalise_section_name("CONCLUSION") == "impression"
    assert normalise_section_name("FINDINGS AND IMPRESSION") == "impression"  # exact before substring
    assert normalise_section_name("PRELIMINARY FINDINGS") == "findings"  # substring
    assert normalise_section_name("HISTORY AND IMPRESSION") == "impression"  # impression is tested first
    assert normalise_section_name("PA AND LATERAL VIEWS OF THE ABDOMEN") == "findings"  # view phrase
    assert normalise_section_name("TECHNIQUE") == "technique"
    assert normalise_section_name("PROCEDURE") == "procedure"  # unknown names are kept


def test_view_headers_count_as_findings_and_the_last_findings_wins():
    text = report(" FINAL REPORT", " FINDINGS:", " ", " First read.", " ", " PA AND LATERAL VIEWS OF THE CHEST:",
                  " ", " Second read, the final one.", " ", " IMPRESSION:", " ", " Normal.")
    assert findings_section(text) == "Second read, the final one."


def test_empty_findings_are_dropped():
    text = " FINAL REPORT\n FINDINGS:  \n\n IMPRESSION: Normal chest.\n"
    assert [n for n, _ in split_sections(text)] == ["preamble", "impression"]
    assert findings_section(text) is None


def test_without_findings_or_impression_the_last_paragraph_is_split_off():
    text = report(" FINAL REPORT", " INDICATION: cough", " ", " Lungs are clear.")
    sections = split_sections(text)
    assert sections[-1][0] == "last_paragraph"
    assert sections[-1][1].strip() == "Lungs are clear."
    assert findings_section(text) is None  # the paper keeps FINDINGS only


def test_r2gen_cleaning_known_answer():
    # Worked by hand from the rules in DATASETS.md section C: newlines to spaces, "___" to "_",
    # double spaces and ".." collapsed, "1. " deleted and ". 2. " / " 2. " to ". " (6 is left),
    # lower case, sentences split on ". ", quotes and slashes deleted, then the character class
    # (which also spans ":" to "["), joined with " . " and ended with " .".
    text = '1. No pneumothorax.  2. Small  effusion..  ___ Heart size (normal); see "note"/x.\n 6. Stable: 10% [a]{b} #3 ~ok'
    assert clean_report(text) == "no pneumothorax . small effusion .  heart size normal see notex . 6 . stable 10 ab #3 ~ok ."


def test_r2gen_cleaning_of_a_plain_report():
    assert clean_report("The lungs are clear. No pleural effusion.") == "the lungs are clear . no pleural effusion ."
    assert clean_report("Heart size is normal.\n Mild edema, unchanged.") == "heart size is normal . mild edema unchanged ."
