#!/usr/bin/env bash
# Open a `semroute report` page in a real headless browser (Debian's chromium: apt-get install -y chromium):
# take a screenshot, and fail on any console message of level warning or error (a broken image, a blocked
# resource, a parse error) or when the rendered DOM lacks the charts and images the page promises.
#
#   bash bench/check_report.sh REPORT.html [SCREENSHOT.png]
#
# Prints the counts it checked; exit status 0 only when all checks pass. Not part of CI (chromium is
# ~300 MB); CI checks the page's content in tests/test_report.py.
set -euo pipefail
page=$(realpath "$1")
shot=${2:-${page%.html}.png}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "no chromium found: apt-get install -y chromium" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
flags=(--headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$work/profile"
       --enable-logging=stderr --v=0 --virtual-time-budget=5000)

# 1. Screenshot (what a user sees at the top of the page).
"$browser" "${flags[@]}" --window-size=1200,2000 --screenshot="$shot" "file://$page" 2>"$work/shot.log" >/dev/null
[ -s "$shot" ] || { echo "FAIL: no screenshot written"; cat "$work/shot.log"; exit 1; }

# 2. The DOM after rendering, with the console log of that load.
"$browser" "${flags[@]}" --dump-dom "file://$page" >"$work/dom.html" 2>"$work/dom.log"
count() { { grep -o "$1" "$2" || true; } | wc -l; }
svgs=$(count '<svg' "$work/dom.html")
imgs=$(count '<img' "$work/dom.html")
broken=$(count 'src="data:image/png;base64,"' "$work/dom.html")
# Chromium logs page console messages as "CONSOLE(line)" lines; resource failures as "Failed to load" / "Not allowed".
console=$(cat "$work/shot.log" "$work/dom.log" | grep -E 'CONSOLE|Uncaught|Failed to load|Not allowed to load' || true)
echo "page: $page ($(du -h "$page" | cut -f1))"
echo "screenshot: $shot"
echo "svg charts: $svgs, images: $imgs, empty images: $broken"
echo "console messages: $( [ -n "$console" ] && echo "$console" | wc -l || echo 0)"
status=0
[ "$svgs" -ge 1 ] || { echo "FAIL: no chart rendered"; status=1; }
[ "$broken" -eq 0 ] || { echo "FAIL: empty image sources"; status=1; }
[ -z "$console" ] || { echo "FAIL: console messages:"; echo "$console"; status=1; }
[ $status -eq 0 ] && echo "OK"
exit $status
