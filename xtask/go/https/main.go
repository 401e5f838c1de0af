// A Go HTTPS server (and client) built with symbols: the lab's second Go crypto/tls program
// next to Debian's stripped caddy, so the tracer's .symtab and .gopclntab paths can both be
// checked against the same toolchain's output.
//
//	https -listen 10.10.2.2:8443 -cert leaf.pem -key leaf.key   # serve until killed
//	https -get https://10.10.2.2:8443/x -ca ca.pem [-traceparent 00-...]   # one GET, print status
package main

import (
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
)

func main() {
	listen := flag.String("listen", "", "serve HTTPS on this address")
	cert := flag.String("cert", "", "server certificate (PEM)")
	key := flag.String("key", "", "server key (PEM)")
	get := flag.String("get", "", "GET this URL once and print the status code")
	ca := flag.String("ca", "", "CA to trust for -get (PEM)")
	traceparent := flag.String("traceparent", "", "traceparent header for -get")
	flag.Parse()
	switch {
	case *listen != "":
		serve(*listen, *cert, *key)
	case *get != "":
		fetch(*get, *ca, *traceparent)
	default:
		flag.Usage()
		os.Exit(2)
	}
}

func serve(listen, cert, key string) {
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprintf(w, "go https %s %s\n", r.Method, r.URL.Path)
	})
	log.Fatal(http.ListenAndServeTLS(listen, cert, key, nil))
}

func fetch(url, ca, traceparent string) {
	pem, err := os.ReadFile(ca)
	if err != nil {
		log.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		log.Fatalf("no certificate in %s", ca)
	}
	// HTTP/1.1 only (no ForceAttemptHTTP2): the request head crosses TLS as plain text.
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		log.Fatal(err)
	}
	if traceparent != "" {
		req.Header.Set("traceparent", traceparent)
	}
	resp, err := client.Do(req)
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		log.Fatal(err)
	}
	fmt.Println(resp.StatusCode)
}
