// A Go program without crypto/tls (package net only): the tracer must skip it with a clear
// log line, not probe it.
//
//	plaintcp -listen 10.10.2.2:9000   # echo each connection's bytes back until killed
package main

import (
	"flag"
	"io"
	"log"
	"net"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "TCP address to echo on")
	flag.Parse()
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	for {
		conn, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go func() {
			defer conn.Close()
			_, _ = io.Copy(conn, conn)
		}()
	}
}
