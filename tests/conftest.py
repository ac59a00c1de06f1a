"""Options every test directory shares."""


def pytest_addoption(parser):
    parser.addoption("--rewrite", action="store_true", default=False,
                     help="transcripts (tests/harness/testdata): write the actual output back into the files")
