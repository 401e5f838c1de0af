// The lab's own Go programs, built from source by xtask/src/lab/golang.rs with Debian's
// golang-1.19 (standard library only: nothing to download).
module hoptrace.invalid/labgo

go 1.19
